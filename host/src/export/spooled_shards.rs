//! Safetensors shards for tensors whose sizes are known only once they are produced (the packed
//! NF4 quant state holds a JSON number of varying length). Each shard's data is spooled to a
//! body file as tensors arrive; `finish` writes every shard as header + body, names them
//! `model-0000i-of-0000n.safetensors` (or `model.safetensors`) once n is known, and writes the
//! index. Memory holds one tensor group; the disk holds the spooled bodies until `finish`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde_json::json;

use super::bnb_nf4::StoredTensor;

struct Entry {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    begin: u64,
    end: u64,
}

struct Shard {
    entries: Vec<Entry>,
    body_path: PathBuf,
    body: BufWriter<File>,
    size: u64,
}

pub struct SpooledShards {
    dir: PathBuf,
    max_shard_bytes: u64,
    shards: Vec<Shard>,
}

fn shard_name(i: usize, n: usize) -> String {
    if n == 1 {
        "model.safetensors".into()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
    }
}

impl SpooledShards {
    /// Shards go into `dir` (a staging directory the caller moves into place).
    pub fn new(dir: &Path, max_shard_bytes: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(SpooledShards {
            dir: dir.to_path_buf(),
            max_shard_bytes,
            shards: Vec::new(),
        })
    }

    /// Appends tensors that belong together (one module's weight and its quant state) to one
    /// shard. As transformers shards, a new shard starts when the group would overflow a
    /// non-empty one.
    pub fn write_group(&mut self, group: &[StoredTensor]) -> Result<()> {
        let bytes: u64 = group.iter().map(|t| t.bytes.len() as u64).sum();
        let full = self
            .shards
            .last()
            .is_none_or(|s| s.size > 0 && s.size + bytes > self.max_shard_bytes);
        if full {
            let body_path = self.dir.join(format!(".body-{}", self.shards.len()));
            let file = File::create(&body_path)
                .with_context(|| format!("cannot create {}", body_path.display()))?;
            self.shards.push(Shard {
                entries: Vec::new(),
                body_path,
                body: BufWriter::with_capacity(1 << 20, file),
                size: 0,
            });
        }
        let shard = self.shards.last_mut().expect("a shard is open");
        for t in group {
            let begin = shard.size;
            shard.body.write_all(&t.bytes)?;
            shard.size += t.bytes.len() as u64;
            shard.entries.push(Entry {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                begin,
                end: shard.size,
            });
        }
        Ok(())
    }

    /// Writes the shards (header, then the spooled body) and, when there are several, the index.
    /// Returns the files written.
    pub fn finish(self) -> Result<Vec<PathBuf>> {
        ensure!(!self.shards.is_empty(), "no tensors were written");
        let n = self.shards.len();
        let mut files = Vec::new();
        let mut weight_map = BTreeMap::new();
        let mut total = 0u64;
        for (i, shard) in self.shards.into_iter().enumerate() {
            let name = shard_name(i, n);
            let mut header = serde_json::Map::new();
            header.insert("__metadata__".into(), json!({"format": "pt"}));
            for e in &shard.entries {
                header.insert(
                    e.name.clone(),
                    json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [e.begin, e.end]}),
                );
                weight_map.insert(e.name.clone(), name.clone());
            }
            let mut text = serde_json::to_string(&header)?;
            // safetensors aligns the data start to 8 bytes by padding the header with spaces.
            while text.len() % 8 != 0 {
                text.push(' ');
            }
            // Flushed and closed here; the body file was opened write-only, so it is re-read.
            drop(
                shard
                    .body
                    .into_inner()
                    .map_err(|e| e.into_error())
                    .context("cannot flush a spooled shard")?,
            );
            let path = self.dir.join(&name);
            let mut out =
                File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
            out.write_all(&(text.len() as u64).to_le_bytes())?;
            out.write_all(text.as_bytes())?;
            let copied = std::io::copy(&mut File::open(&shard.body_path)?, &mut out)
                .with_context(|| format!("cannot write {}", path.display()))?;
            ensure!(
                copied == shard.size,
                "{}: {copied} bytes copied, {} spooled",
                path.display(),
                shard.size
            );
            out.sync_all()?;
            std::fs::remove_file(&shard.body_path)?;
            total += shard.size;
            files.push(path);
        }
        if n > 1 {
            let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            let path = self.dir.join("model.safetensors.index.json");
            std::fs::write(&path, serde_json::to_string_pretty(&index)?)
                .with_context(|| format!("cannot write {}", path.display()))?;
            files.push(path);
        }
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, bytes: Vec<u8>) -> StoredTensor {
        StoredTensor {
            name: name.into(),
            dtype: "U8",
            shape: vec![bytes.len()],
            bytes,
        }
    }

    #[test]
    fn groups_stay_in_one_shard_and_read_back_with_the_safetensors_crate() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SpooledShards::new(dir.path(), 10).unwrap();
        w.write_group(&[t("a", vec![1; 4]), t("a.s", vec![2; 3])])
            .unwrap();
        w.write_group(&[t("b", vec![3; 5])]).unwrap();
        w.write_group(&[t("c", vec![4; 20])]).unwrap();
        let files = w.finish().unwrap();
        assert_eq!(files.len(), 4, "three shards and the index");
        let index: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            index["weight_map"]["a.s"],
            "model-00001-of-00003.safetensors"
        );
        assert_eq!(index["weight_map"]["b"], "model-00002-of-00003.safetensors");
        assert_eq!(index["metadata"]["total_size"], 32);
        let bytes = std::fs::read(dir.path().join("model-00001-of-00003.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("a").unwrap().data(), [1; 4]);
        assert_eq!(st.tensor("a.s").unwrap().data(), [2; 3]);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".body"))
            .collect();
        assert!(leftovers.is_empty(), "spooled bodies are removed");
    }

    #[test]
    fn one_shard_is_model_safetensors_without_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SpooledShards::new(dir.path(), 1000).unwrap();
        w.write_group(&[t("x", vec![9; 7])]).unwrap();
        let files = w.finish().unwrap();
        assert_eq!(files, [dir.path().join("model.safetensors")]);
    }
}
