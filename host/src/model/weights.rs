//! Base weights from safetensors: `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Files are memory-mapped and each tensor is converted to f32 on
//! the CPU once at load (bf16/f16/f32 accepted, and the NF4 weights of a pre-quantised
//! bitsandbytes checkpoint), so the engine computes in f32 throughout.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{safetensors::MmapedSafetensors, DType, Device, Tensor};
use safetensors::Dtype;

use super::bnb4::Prequantized;
use crate::export::bnb_nf4::RawTensor;

/// The model's frozen tensors by their Hugging Face names (`model.layers.0.self_attn.q_proj.weight`).
#[derive(Debug)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
}

/// The safetensors files of a model directory: the shards of the index, else `model.safetensors`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{} has no \"weight_map\" object", index.display()))?;
        let mut files = BTreeSet::new();
        for (name, file) in map {
            let file = file.as_str().with_context(|| {
                format!(
                    "{}: weight_map[{name:?}] is not a file name",
                    index.display()
                )
            })?;
            files.insert(file.to_string());
        }
        if files.is_empty() {
            bail!("{} lists no shards in \"weight_map\"", index.display());
        }
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    bail!(
        "{}: no model.safetensors and no model.safetensors.index.json; ferrotune loads Hugging Face \
         safetensors weights (convert .bin checkpoints with transformers' save_pretrained)",
        dir.display()
    )
}

impl Weights {
    /// Loads every tensor of the model directory's safetensors files as f32. The NF4 weights of
    /// a pre-quantised bitsandbytes checkpoint ([`super::bnb4`]) are dequantised exactly as
    /// `bnb.functional.dequantize_4bit` does (level × block absmax, rounded to the quant
    /// state's dtype); their companion tensors (absmax, maps, quant state) are not weights.
    pub fn load(dir: &Path) -> Result<Self> {
        let files = safetensors_files(dir)?;
        let mut maps = Vec::with_capacity(files.len());
        let mut index: HashMap<String, usize> = HashMap::new();
        for file in &files {
            if !file.is_file() {
                bail!(
                    "{}: shard listed in model.safetensors.index.json is missing",
                    file.display()
                );
            }
            // SAFETY: the file is mapped read-only and copied into owned f32 tensors before the
            // map is dropped; like every mmap loader we assume no one truncates it meanwhile.
            let mapped = unsafe { MmapedSafetensors::new(file) }.with_context(|| {
                format!(
                    "{}: not a valid safetensors file (corrupt or truncated?)",
                    file.display()
                )
            })?;
            for (name, _) in mapped.tensors() {
                if index.insert(name.clone(), maps.len()).is_some() {
                    bail!(
                        "tensor {name:?} appears in more than one shard ({})",
                        file.display()
                    );
                }
            }
            maps.push((file, mapped));
        }
        let prequantized = Prequantized::detect(dir, index.keys().map(String::as_str))?;
        if let Some(p) = &prequantized {
            tracing::info!(
                "{}",
                p.describe(dir, "dequantised to f32 as bitsandbytes does")
            );
        }
        // Companion tensors may sit in another shard than the codes they belong to.
        let raw = |name: &str| -> Result<Option<RawTensor<'_>>> {
            let Some(&i) = index.get(name) else {
                return Ok(None);
            };
            let view = maps[i].1.get(name)?;
            Ok(Some(RawTensor {
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                bytes: Cow::Borrowed(view.data()),
            }))
        };
        let mut tensors = HashMap::new();
        for (name, &i) in &index {
            let (file, mapped) = &maps[i];
            let tensor = match &prequantized {
                Some(p) if p.is_companion(name) => continue,
                Some(p) if p.is_nf4(name) => {
                    let w = p.read(name, None, raw)?;
                    Tensor::from_vec(w.dequantize(), w.shape.clone(), &Device::Cpu)?
                }
                _ => {
                    let dtype = mapped.get(name)?.dtype();
                    if !matches!(dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32 | Dtype::F64) {
                        bail!(
                            "{}: tensor {name:?} is {dtype:?}; base weights are bf16, f16 or f32 \
                             (or bitsandbytes NF4 with their quant state)",
                            file.display()
                        );
                    }
                    mapped
                        .load(name, &Device::Cpu)
                        .and_then(|t| t.to_dtype(DType::F32))
                        .with_context(|| {
                            format!("{}: cannot read tensor {name:?}", file.display())
                        })?
                }
            };
            tensors.insert(name.clone(), tensor);
        }
        Ok(Weights { tensors })
    }

    /// Wraps already-built tensors (tests, generated models).
    pub fn from_tensors(tensors: HashMap<String, Tensor>) -> Self {
        Weights { tensors }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name` without a shape check (callers that derive shapes themselves).
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The tensor `name`, checked against the shape the architecture expects.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.get(name).with_context(|| {
            format!("weight {name:?} is missing from the model's safetensors files")
        })?;
        if t.dims() != shape {
            bail!(
                "weight {name:?} has shape {:?} but config.json implies {shape:?}",
                t.dims()
            );
        }
        Ok(t.clone())
    }

    /// Total number of scalar parameters.
    pub fn numel(&self) -> usize {
        self.tensors.values().map(Tensor::elem_count).sum()
    }
}
