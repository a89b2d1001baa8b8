//! Base weights from safetensors: `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Files are memory-mapped and each tensor is converted to f32 on
//! the CPU once at load (bf16/f16/f32 accepted), so the engine computes in f32 throughout.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{safetensors::MmapedSafetensors, DType, Device, Tensor};

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
    /// Loads every tensor of the model directory's safetensors files as f32.
    pub fn load(dir: &Path) -> Result<Self> {
        let files = safetensors_files(dir)?;
        let mut tensors = HashMap::new();
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
                let tensor = mapped
                    .load(&name, &Device::Cpu)
                    .and_then(|t| t.to_dtype(DType::F32))
                    .with_context(|| format!("{}: cannot read tensor {name:?}", file.display()))?;
                if tensors.insert(name.clone(), tensor).is_some() {
                    bail!(
                        "tensor {name:?} appears in more than one shard ({})",
                        file.display()
                    );
                }
            }
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
