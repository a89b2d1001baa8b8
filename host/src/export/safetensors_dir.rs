//! A Hugging Face model directory's safetensors weights, memory-mapped and read one tensor at a
//! time as f32 (bf16, f16 and f32 storage).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::gguf::convert::TensorSource;

/// Storage dtypes the export path reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreDtype {
    F32,
    F16,
    BF16,
}

impl StoreDtype {
    pub fn from_safetensors(d: Dtype) -> Option<Self> {
        match d {
            Dtype::F32 => Some(StoreDtype::F32),
            Dtype::F16 => Some(StoreDtype::F16),
            Dtype::BF16 => Some(StoreDtype::BF16),
            _ => None,
        }
    }

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

    /// Encodes f32 values in this dtype (round to nearest even).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        use crate::gguf::quant::{f32_to_bf16_bits, f32_to_f16_bits};
        let mut out = Vec::with_capacity(values.len() * self.size());
        for &v in values {
            match self {
                StoreDtype::F32 => out.extend_from_slice(&v.to_le_bytes()),
                StoreDtype::F16 => out.extend_from_slice(&f32_to_f16_bits(v).to_le_bytes()),
                StoreDtype::BF16 => out.extend_from_slice(&f32_to_bf16_bits(v).to_le_bytes()),
            }
        }
        out
    }

    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        use crate::gguf::quant::{bf16_bits_to_f32, f16_bits_to_f32};
        match self {
            StoreDtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            StoreDtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
            StoreDtype::BF16 => bytes
                .chunks_exact(2)
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
}

pub struct SafetensorsDir {
    files: Vec<(PathBuf, Mmap)>,
    /// Tensors in file order, then header order.
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
            // SAFETY: the file is opened read-only and ferrotune never writes a file it reads;
            // a concurrent external writer could change bytes under us, as with any mmap reader.
            let mmap = unsafe { Mmap::map(&file) }
                .with_context(|| format!("cannot map {}", path.display()))?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| {
                anyhow::anyhow!("{} is not a safetensors file: {e}", path.display())
            })?;
            let mut names: Vec<(String, usize)> = st
                .tensors()
                .into_iter()
                .map(|(n, v)| {
                    let start = v.data().as_ptr() as usize;
                    (n, start)
                })
                .collect();
            names.sort_by_key(|(_, start)| *start);
            for (name, _) in names {
                let view = st
                    .tensor(&name)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                let Some(dtype) = StoreDtype::from_safetensors(view.dtype()) else {
                    bail!(
                        "{}: tensor {name} is {:?}; export reads F32, F16 and BF16 weights",
                        path.display(),
                        view.dtype()
                    );
                };
                if by_name.insert(name.clone(), metas.len()).is_some() {
                    bail!("tensor {name} appears in two safetensors files");
                }
                metas.push(TensorMeta {
                    name,
                    shape: view.shape().to_vec(),
                    dtype,
                    file: files.len(),
                });
            }
            files.push((path, mmap));
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
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let meta = self
            .meta(name)
            .with_context(|| format!("no tensor {name} in the weights"))?;
        let (path, mmap) = &self.files[meta.file];
        let st = SafeTensors::deserialize(mmap)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let view = st
            .tensor(name)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let data = view.data();
        // Re-slice from the mmap so the borrow is tied to `self`, not to the parsed header.
        let start = data.as_ptr() as usize - mmap.as_ptr() as usize;
        Ok(&mmap[start..start + data.len()])
    }
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
        Ok(meta.dtype.decode(self.bytes(name)?))
    }
}
