//! A Hugging Face model directory's safetensors weights, read one tensor at a time as f32 (bf16,
//! f16 and f32 storage).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::os::unix::fs::FileExt;

use crate::gguf::convert::TensorSource;

/// Values per parallel work item when converting between f32 and a storage dtype: large enough
/// that scheduling costs nothing next to the conversion.
const PAR_MIN: usize = 1 << 14;

/// Storage dtypes the export path reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreDtype {
    F32,
    F16,
    BF16,
}

impl StoreDtype {
    /// safetensors' dtype name in file headers.
    pub fn name(self) -> &'static str {
        match self {
            StoreDtype::F32 => "F32",
            StoreDtype::F16 => "F16",
            StoreDtype::BF16 => "BF16",
        }
    }

    pub fn size(self) -> usize {
        match self {
            StoreDtype::F32 => 4,
            _ => 2,
        }
    }

    /// Encodes f32 values in this dtype (round to nearest even), on all cores.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        use crate::gguf::quant::{f32_to_bf16_bits, f32_to_f16_bits};
        let size = self.size();
        let mut out = vec![0u8; values.len() * size];
        out.par_chunks_exact_mut(size)
            .zip(values.par_iter())
            .with_min_len(PAR_MIN)
            .for_each(|(o, &v)| match self {
                StoreDtype::F32 => o.copy_from_slice(&v.to_le_bytes()),
                StoreDtype::F16 => o.copy_from_slice(&f32_to_f16_bits(v).to_le_bytes()),
                StoreDtype::BF16 => o.copy_from_slice(&f32_to_bf16_bits(v).to_le_bytes()),
            });
        out
    }

    /// The nearest value this dtype stores (round to nearest even).
    pub fn round(self, v: f32) -> f32 {
        use crate::gguf::quant::{
            bf16_bits_to_f32, f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits,
        };
        match self {
            StoreDtype::F32 => v,
            StoreDtype::F16 => f16_bits_to_f32(f32_to_f16_bits(v)),
            StoreDtype::BF16 => bf16_bits_to_f32(f32_to_bf16_bits(v)),
        }
    }

    /// Decodes stored bytes to f32, on all cores.
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        use crate::gguf::quant::{bf16_bits_to_f32, f16_bits_to_f32};
        match self {
            StoreDtype::F32 => bytes
                .par_chunks_exact(4)
                .with_min_len(PAR_MIN)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            StoreDtype::F16 => bytes
                .par_chunks_exact(2)
                .with_min_len(PAR_MIN)
                .map(|b| f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
            StoreDtype::BF16 => bytes
                .par_chunks_exact(2)
                .with_min_len(PAR_MIN)
                .map(|b| bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorMeta {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: StoreDtype,
    file: usize,
    /// Absolute byte range in the file.
    start: u64,
    len: usize,
}

/// Tensors are read with positioned reads into owned buffers rather than through a memory map:
/// resident memory then holds only the tensor being processed, not every page touched so far.
pub struct SafetensorsDir {
    files: Vec<(PathBuf, File)>,
    /// Tensors in file order, then data order.
    metas: Vec<TensorMeta>,
    by_name: HashMap<String, usize>,
}

impl SafetensorsDir {
    /// Opens the safetensors files of a model directory (index shards or `model.safetensors`).
    pub fn open_model_dir(dir: &Path) -> Result<Self> {
        Self::open_files(crate::model::weights::safetensors_files(dir)?)
    }

    pub fn open_files(paths: Vec<PathBuf>) -> Result<Self> {
        let mut files = Vec::new();
        let mut metas = Vec::new();
        let mut by_name = HashMap::new();
        for path in paths {
            let file =
                File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            let mut entries = read_header(&file)
                .with_context(|| format!("{} is not a safetensors file", path.display()))?;
            entries.sort_by_key(|e| e.start);
            for mut meta in entries {
                meta.file = files.len();
                if by_name.insert(meta.name.clone(), metas.len()).is_some() {
                    bail!("tensor {} appears in two safetensors files", meta.name);
                }
                metas.push(meta);
            }
            files.push((path, file));
        }
        Ok(SafetensorsDir {
            files,
            metas,
            by_name,
        })
    }

    pub fn metas(&self) -> &[TensorMeta] {
        &self.metas
    }

    pub fn meta(&self, name: &str) -> Option<&TensorMeta> {
        self.by_name.get(name).map(|&i| &self.metas[i])
    }

    /// The stored bytes of one tensor.
    pub fn bytes(&self, name: &str) -> Result<Vec<u8>> {
        let meta = self
            .meta(name)
            .with_context(|| format!("no tensor {name} in the weights"))?;
        let (path, file) = &self.files[meta.file];
        let mut buf = vec![0u8; meta.len];
        file.read_exact_at(&mut buf, meta.start)
            .with_context(|| format!("{}: cannot read tensor {name}", path.display()))?;
        Ok(buf)
    }
}

/// Parses a safetensors header: u64 length, then JSON `{name: {dtype, shape, data_offsets}}`.
fn read_header(file: &File) -> Result<Vec<TensorMeta>> {
    let mut len = [0u8; 8];
    file.read_exact_at(&mut len, 0)?;
    let n = u64::from_le_bytes(len);
    let file_len = file.metadata()?.len();
    if n > 100 << 20 || 8 + n > file_len {
        bail!("header length {n} does not fit the file");
    }
    let mut text = vec![0u8; n as usize];
    file.read_exact_at(&mut text, 8)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&text)?;
    let data_start = 8 + n;
    let mut out = Vec::new();
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype_name = info["dtype"].as_str().unwrap_or("?");
        let dtype = match dtype_name {
            "F32" => StoreDtype::F32,
            "F16" => StoreDtype::F16,
            "BF16" => StoreDtype::BF16,
            other => bail!("tensor {name} is {other}; export reads F32, F16 and BF16 weights"),
        };
        let shape: Vec<usize> = info["shape"]
            .as_array()
            .with_context(|| format!("tensor {name}: no shape"))?
            .iter()
            .map(|d| {
                d.as_u64()
                    .map(|d| d as usize)
                    .with_context(|| format!("tensor {name}: bad shape"))
            })
            .collect::<Result<_>>()?;
        let offsets = info["data_offsets"]
            .as_array()
            .with_context(|| format!("tensor {name}: no data_offsets"))?;
        let (begin, end) = match offsets.as_slice() {
            [b, e] => (b.as_u64().unwrap_or(u64::MAX), e.as_u64().unwrap_or(0)),
            _ => bail!("tensor {name}: bad data_offsets"),
        };
        let len = shape.iter().product::<usize>() * dtype.size();
        if end < begin || end - begin != len as u64 || data_start + end > file_len {
            bail!("tensor {name}: data_offsets [{begin}, {end}] do not match its shape {shape:?} or the file");
        }
        out.push(TensorMeta {
            name,
            shape,
            dtype,
            file: 0,
            start: data_start + begin,
            len,
        });
    }
    Ok(out)
}

impl TensorSource for SafetensorsDir {
    fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        self.metas
            .iter()
            .map(|m| (m.name.clone(), m.shape.clone()))
            .collect()
    }

    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let meta = self
            .meta(name)
            .with_context(|| format!("no tensor {name} in the weights"))?;
        Ok(meta.dtype.decode(&self.bytes(name)?))
    }
}
