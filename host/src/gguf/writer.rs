//! Streaming GGUF v3 writer: the header (metadata + tensor infos) first, then tensor data in
//! declaration order, each tensor padded to the alignment. Because every tensor's byte size
//! follows from its shape and type, the header is complete before any data exists, so tensors
//! can be produced and written one at a time (memory bounded by one tensor).
//!
//! The file is written to `NAME.partial` beside the destination and renamed into place by
//! [`GgufWriter::finish`]; an unfinished writer removes its partial file when dropped.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use super::types::GgmlType;
use super::value::{write_string, Value};

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const VERSION: u32 = 3;
/// ggml's `GGUF_DEFAULT_ALIGNMENT`; `general.alignment` overrides it.
pub const DEFAULT_ALIGNMENT: usize = 32;
pub const ALIGNMENT_KEY: &str = "general.alignment";

/// A tensor as declared in the header. `shape` is row-major (PyTorch order, the last dimension
/// is a row); the file stores it reversed, as ggml's `ne`.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
}

impl TensorInfo {
    pub fn new(name: impl Into<String>, shape: Vec<usize>, ty: GgmlType) -> Self {
        TensorInfo {
            name: name.into(),
            shape,
            ty,
        }
    }

    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn row_len(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Bytes of the tensor's data (without padding).
    pub fn byte_len(&self) -> Result<usize> {
        let rows = self.n_elements() / self.row_len().max(1);
        let row = self
            .ty
            .row_bytes(self.row_len())
            .with_context(|| format!("tensor {}", self.name))?;
        Ok(rows * row)
    }
}

pub fn align_up(n: u64, alignment: usize) -> u64 {
    let a = alignment as u64;
    n.div_ceil(a) * a
}

pub struct GgufWriter {
    out: BufWriter<File>,
    partial: PathBuf,
    dest: PathBuf,
    tensors: Vec<TensorInfo>,
    next: usize,
    alignment: usize,
    finished: bool,
}

impl GgufWriter {
    /// Creates `dest`'s partial file and writes the whole header.
    pub fn create(
        dest: &Path,
        metadata: &[(String, Value)],
        tensors: Vec<TensorInfo>,
    ) -> Result<Self> {
        let alignment = alignment_of(metadata)?;
        check_declarations(metadata, &tensors)?;
        let partial = partial_path(dest);
        let file = File::create(&partial)
            .with_context(|| format!("cannot create {}", partial.display()))?;
        let mut writer = GgufWriter {
            out: BufWriter::with_capacity(1 << 20, file),
            partial,
            dest: dest.to_path_buf(),
            tensors,
            next: 0,
            alignment,
            finished: false,
        };
        writer
            .write_header(metadata)
            .with_context(|| format!("writing {}", dest.display()))?;
        Ok(writer)
    }

    fn write_header(&mut self, metadata: &[(String, Value)]) -> Result<()> {
        let w = &mut self.out;
        w.write_all(MAGIC)?;
        w.write_all(&VERSION.to_le_bytes())?;
        w.write_all(&(self.tensors.len() as u64).to_le_bytes())?;
        w.write_all(&(metadata.len() as u64).to_le_bytes())?;
        for (key, value) in metadata {
            write_string(w, key)?;
            value.write(w)?;
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            write_string(w, &t.name)?;
            w.write_all(&(t.shape.len() as u32).to_le_bytes())?;
            for d in t.shape.iter().rev() {
                w.write_all(&(*d as u64).to_le_bytes())?;
            }
            w.write_all(&t.ty.id().to_le_bytes())?;
            w.write_all(&offset.to_le_bytes())?;
            offset = align_up(offset + t.byte_len()? as u64, self.alignment);
        }
        self.pad()?;
        Ok(())
    }

    fn pad(&mut self) -> Result<()> {
        let pos = self.out.stream_position()?;
        let padding = (align_up(pos, self.alignment) - pos) as usize;
        self.out.write_all(&vec![0u8; padding])?;
        Ok(())
    }

    /// The tensor whose data [`Self::write_tensor`] expects next.
    pub fn next_tensor(&self) -> Option<&TensorInfo> {
        self.tensors.get(self.next)
    }

    /// Writes the data of the next declared tensor, which must be `name` with exactly the
    /// declared byte size.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let Some(info) = self.tensors.get(self.next) else {
            bail!("tensor {name}: every declared tensor is already written");
        };
        ensure!(
            info.name == name,
            "tensor {name} written out of order: the header declares {} next",
            info.name
        );
        let expected = info.byte_len()?;
        ensure!(
            data.len() == expected,
            "tensor {name}: {} bytes of data, its {} shape {:?} needs {expected}",
            data.len(),
            info.ty,
            info.shape
        );
        self.out.write_all(data)?;
        self.pad()?;
        self.next += 1;
        Ok(())
    }

    /// Checks that every tensor was written, syncs and moves the file into place.
    pub fn finish(mut self) -> Result<PathBuf> {
        ensure!(
            self.next == self.tensors.len(),
            "{}: only {} of {} tensors written",
            self.dest.display(),
            self.next,
            self.tensors.len()
        );
        self.out.flush()?;
        self.out.get_ref().sync_all()?;
        std::fs::rename(&self.partial, &self.dest)
            .with_context(|| format!("cannot move {} into place", self.dest.display()))?;
        self.finished = true;
        Ok(self.dest.clone())
    }
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

fn partial_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    dest.with_file_name(name)
}

fn alignment_of(metadata: &[(String, Value)]) -> Result<usize> {
    match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => Ok(DEFAULT_ALIGNMENT),
        Some((_, Value::U32(a))) if a.is_power_of_two() && *a >= 8 => Ok(*a as usize),
        Some((_, v)) => bail!("{ALIGNMENT_KEY} must be a u32 power of two >= 8, got {v:?}"),
    }
}

fn check_declarations(metadata: &[(String, Value)], tensors: &[TensorInfo]) -> Result<()> {
    let mut keys = HashSet::new();
    for (key, _) in metadata {
        ensure!(keys.insert(key.as_str()), "metadata key {key} given twice");
    }
    let mut names = HashSet::new();
    for t in tensors {
        ensure!(
            names.insert(t.name.as_str()),
            "tensor {} declared twice",
            t.name
        );
        ensure!(
            !t.shape.is_empty() && t.shape.len() <= 4,
            "tensor {}: {} dimensions (GGUF allows 1..=4)",
            t.name,
            t.shape.len()
        );
        t.byte_len()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::quant;
    use crate::gguf::reader::GgufFile;

    fn sample_metadata() -> Vec<(String, Value)> {
        vec![
            ("general.architecture".into(), Value::String("llama".into())),
            ("llama.block_count".into(), Value::U32(2)),
            ("llama.rope.freq_base".into(), Value::F32(500000.0)),
            (
                "tokenizer.ggml.tokens".into(),
                Value::ArrayString(vec!["a".into(), "é b".into()]),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                Value::ArrayI32(vec![1, 3]),
            ),
            (
                "tokenizer.ggml.scores".into(),
                Value::ArrayF32(vec![0.0, -1.5]),
            ),
            ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        ]
    }

    #[test]
    fn header_and_data_round_trip_through_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let values: Vec<f32> = (0..3 * 256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
            .collect();
        let tensors = vec![
            TensorInfo::new("a.weight", vec![3, 256], GgmlType::Q4_K),
            TensorInfo::new("b.weight", vec![5], GgmlType::F32),
        ];
        let mut w = GgufWriter::create(&path, &sample_metadata(), tensors).unwrap();
        w.write_tensor(
            "a.weight",
            &quant::quantize_rows(GgmlType::Q4_K, &values, 256).unwrap(),
        )
        .unwrap();
        w.write_tensor(
            "b.weight",
            &[1.0f32, 2.0, 3.0, 4.0, 5.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<_>>(),
        )
        .unwrap();
        w.finish().unwrap();
        assert!(!dir.path().join("m.gguf.partial").exists());

        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.metadata, sample_metadata());
        assert_eq!(f.data_start % 32, 0);
        let a = f.tensor("a.weight").unwrap();
        assert_eq!(
            (a.shape.clone(), a.ty, a.offset),
            (vec![3, 256], GgmlType::Q4_K, 0)
        );
        let b = f.tensor("b.weight").unwrap();
        assert_eq!(b.offset, align_up(3 * 144, 32));
        assert_eq!(f.read_tensor_f32(b).unwrap(), [1.0, 2.0, 3.0, 4.0, 5.0]);
        let back = f.read_tensor_f32(a).unwrap();
        let max_err = values
            .iter()
            .zip(&back)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(max_err < 0.06, "q4_K max error {max_err}");
    }

    #[test]
    fn misuse_is_refused_and_leaves_no_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let tensors = vec![TensorInfo::new("a", vec![2, 32], GgmlType::Q8_0)];
        let mut w = GgufWriter::create(&path, &[], tensors.clone()).unwrap();
        assert!(w
            .write_tensor("b", &[0; 68])
            .unwrap_err()
            .to_string()
            .contains("out of order"));
        assert!(w
            .write_tensor("a", &[0; 67])
            .unwrap_err()
            .to_string()
            .contains("needs 68"));
        drop(w);
        assert!(!path.exists() && !dir.path().join("m.gguf.partial").exists());
        let w = GgufWriter::create(&path, &[], tensors).unwrap();
        assert!(w.finish().unwrap_err().to_string().contains("only 0 of 1"));
        let bad = vec![TensorInfo::new("a", vec![2, 48], GgmlType::Q8_0)];
        assert!(GgufWriter::create(&path, &[], bad).is_err());
        let dup = [
            ("k".to_string(), Value::U32(1)),
            ("k".to_string(), Value::U32(2)),
        ];
        assert!(GgufWriter::create(&path, &dup, vec![]).is_err());
    }
}
