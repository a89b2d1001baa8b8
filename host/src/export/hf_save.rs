//! Writes a model in Hugging Face's layout: safetensors shards of at most `max_shard_bytes`
//! (`model.safetensors`, or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`),
//! streamed: shard membership is planned from shapes up front, so each shard's header is written
//! first and tensors are appended one at a time as they are produced.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;

use super::safetensors_dir::StoreDtype;

/// transformers' default `max_shard_size` ("5GB", decimal).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: StoreDtype,
}

impl PlannedTensor {
    fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size()) as u64
    }
}

/// Splits tensors (in order) into shards of at most `max` bytes, as transformers does: a new
/// shard starts when the next tensor would overflow the current one; a tensor larger than
/// `max` gets a shard of its own.
pub fn plan_shards(tensors: &[PlannedTensor], max: u64) -> Vec<Vec<PlannedTensor>> {
    let mut shards: Vec<Vec<PlannedTensor>> = Vec::new();
    let mut size = 0u64;
    for t in tensors {
        if shards.is_empty() || (size + t.bytes() > max && size > 0) {
            shards.push(Vec::new());
            size = 0;
        }
        size += t.bytes();
        shards.last_mut().unwrap().push(t.clone());
    }
    shards
}

fn shard_name(i: usize, n: usize) -> String {
    if n == 1 {
        "model.safetensors".into()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
    }
}

/// Streams tensors into the planned shards; tensors must arrive in plan order.
pub struct ShardedWriter {
    dir: PathBuf,
    shards: Vec<Vec<PlannedTensor>>,
    shard: usize,
    pos: usize,
    out: Option<BufWriter<File>>,
    total: u64,
    written: Vec<PathBuf>,
}

impl ShardedWriter {
    pub fn new(dir: &Path, tensors: &[PlannedTensor], max_shard_bytes: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let shards = plan_shards(tensors, max_shard_bytes);
        Ok(ShardedWriter {
            dir: dir.to_path_buf(),
            shards,
            shard: 0,
            pos: 0,
            out: None,
            total: 0,
            written: Vec::new(),
        })
    }

    fn open_shard(&mut self) -> Result<()> {
        let tensors = &self.shards[self.shard];
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut offset = 0u64;
        for t in tensors {
            let end = offset + t.bytes();
            header.insert(
                t.name.clone(),
                json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, end]}),
            );
            offset = end;
        }
        let mut text = serde_json::to_string(&header)?;
        // safetensors aligns the data start to 8 bytes by padding the header with spaces.
        while text.len() % 8 != 0 {
            text.push(' ');
        }
        let path = self.dir.join(shard_name(self.shard, self.shards.len()));
        let file =
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(text.len() as u64).to_le_bytes())?;
        out.write_all(text.as_bytes())?;
        self.out = Some(out);
        self.written.push(path);
        Ok(())
    }

    /// Appends the next planned tensor's bytes.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        ensure!(
            self.shard < self.shards.len(),
            "tensor {name}: every planned tensor is written"
        );
        if self.out.is_none() {
            self.open_shard()?;
        }
        let planned = &self.shards[self.shard][self.pos];
        ensure!(
            planned.name == name,
            "tensor {name} written out of order ({} expected)",
            planned.name
        );
        ensure!(
            planned.bytes() == bytes.len() as u64,
            "tensor {name}: {} bytes, planned {}",
            bytes.len(),
            planned.bytes()
        );
        self.out.as_mut().unwrap().write_all(bytes)?;
        self.total += bytes.len() as u64;
        self.pos += 1;
        if self.pos == self.shards[self.shard].len() {
            let mut out = self.out.take().unwrap();
            out.flush()?;
            out.get_ref().sync_all()?;
            self.shard += 1;
            self.pos = 0;
        }
        Ok(())
    }

    /// Writes the index (when sharded) and returns the files written.
    pub fn finish(self) -> Result<Vec<PathBuf>> {
        if self.shard != self.shards.len() {
            bail!(
                "merged model incomplete: shard {} of {} not finished",
                self.shard + 1,
                self.shards.len()
            );
        }
        let mut files = self.written;
        let n = self.shards.len();
        if n > 1 {
            let mut map = BTreeMap::new();
            for (i, shard) in self.shards.iter().enumerate() {
                for t in shard {
                    map.insert(t.name.clone(), shard_name(i, n));
                }
            }
            let index = json!({"metadata": {"total_size": self.total}, "weight_map": map});
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

    fn t(name: &str, n: usize) -> PlannedTensor {
        PlannedTensor {
            name: name.into(),
            shape: vec![n],
            dtype: StoreDtype::F32,
        }
    }

    #[test]
    fn shards_close_before_overflowing() {
        let tensors = [t("a", 10), t("b", 10), t("c", 30), t("d", 1)];
        let plan = plan_shards(&tensors, 80);
        let names: Vec<Vec<&str>> = plan
            .iter()
            .map(|s| s.iter().map(|t| t.name.as_str()).collect())
            .collect();
        assert_eq!(names, [vec!["a", "b"], vec!["c"], vec!["d"]]);
    }

    #[test]
    fn written_shards_read_back_with_the_safetensors_crate() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = [t("a", 3), t("b", 2)];
        let mut w = ShardedWriter::new(dir.path(), &tensors, 12).unwrap();
        w.write("a", &StoreDtype::F32.encode(&[1.0, 2.0, 3.0]))
            .unwrap();
        w.write("b", &StoreDtype::F32.encode(&[4.0, 5.0])).unwrap();
        let files = w.finish().unwrap();
        assert_eq!(files.len(), 3, "two shards and the index");
        let index: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(index["weight_map"]["b"], "model-00002-of-00002.safetensors");
        assert_eq!(index["metadata"]["total_size"], 20);
        let bytes = std::fs::read(dir.path().join("model-00001-of-00002.safetensors")).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(
            StoreDtype::F32.decode(st.tensor("a").unwrap().data()),
            [1.0, 2.0, 3.0]
        );
    }
}
