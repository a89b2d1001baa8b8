//! Reads a PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`, the
//! layout the trainer writes and PEFT's `save_pretrained` writes) and gives, per base weight,
//! the low-rank update to merge.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value as Json;

use super::safetensors_dir::SafetensorsDir;
use crate::gguf::convert::TensorSource;

/// PEFT's prefix in saved adapter tensor names.
const PREFIX: &str = "base_model.model.";

pub struct LoraAdapter {
    pub dir: PathBuf,
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    /// `base_model_name_or_path` from adapter_config.json.
    pub base_model: Option<String>,
    tensors: SafetensorsDir,
    /// Base weight name → (lora_A name, lora_B name).
    pairs: HashMap<String, (String, String)>,
    /// Base tensor name → adapter tensor replacing it (trained biases, `--bias all|lora_only`).
    replacements: HashMap<String, String>,
}

/// One low-rank update: `delta = scale · B · A`, A `[r, in]`, B `[out, r]`, row-major.
pub struct LoraDelta {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub r: usize,
    pub scale: f32,
}

impl LoraAdapter {
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path).with_context(|| {
            format!("cannot read {}: an adapter directory holds adapter_config.json and adapter_model.safetensors", config_path.display())
        })?;
        let config: Json = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
        let field = |k: &str| &config[k];
        if let Some(kind) = field("peft_type").as_str() {
            if kind != "LORA" {
                bail!(
                    "{}: peft_type {kind:?}; only LORA adapters can be merged",
                    config_path.display()
                );
            }
        }
        if field("use_dora").as_bool() == Some(true) {
            bail!(
                "{}: DoRA adapters (use_dora) cannot be merged by this build",
                config_path.display()
            );
        }
        for pattern in ["rank_pattern", "alpha_pattern"] {
            if field(pattern).as_object().is_some_and(|m| !m.is_empty()) {
                bail!(
                    "{}: per-module {pattern} is not supported; merge needs one r and lora_alpha",
                    config_path.display()
                );
            }
        }
        let r = field("r")
            .as_u64()
            .filter(|&r| r > 0)
            .with_context(|| format!("{}: needs a positive \"r\"", config_path.display()))?
            as usize;
        let lora_alpha = field("lora_alpha").as_f64().with_context(|| {
            format!("{}: needs a numeric \"lora_alpha\"", config_path.display())
        })?;
        let use_rslora = field("use_rslora").as_bool().unwrap_or(false);
        let base_model = field("base_model_name_or_path").as_str().map(String::from);
        let weights = dir.join("adapter_model.safetensors");
        if !weights.is_file() {
            bail!(
                "{} is missing (adapter_model.bin pickles are not read; save with safetensors)",
                weights.display()
            );
        }
        let tensors = SafetensorsDir::open_files(vec![weights.clone()])?;
        let mut a_of: HashMap<String, String> = HashMap::new();
        let mut b_of: HashMap<String, String> = HashMap::new();
        let mut replacements = HashMap::new();
        for (name, _) in tensors.tensors() {
            let Some(local) = name.strip_prefix(PREFIX) else {
                bail!(
                    "{}: tensor {name} does not start with {PREFIX:?} (not a PEFT adapter file)",
                    weights.display()
                );
            };
            if let Some(module) = local.strip_suffix(".lora_A.weight") {
                a_of.insert(format!("{module}.weight"), name.clone());
            } else if let Some(module) = local.strip_suffix(".lora_B.weight") {
                b_of.insert(format!("{module}.weight"), name.clone());
            } else if local.ends_with(".bias") {
                replacements.insert(local.to_string(), name.clone());
            } else {
                bail!(
                    "{}: tensor {name} is neither a LoRA factor nor a bias (modules_to_save and embedding adapters are not merged by this build)",
                    weights.display()
                );
            }
        }
        let mut pairs = HashMap::new();
        for (base, a) in a_of {
            let b = b_of
                .remove(&base)
                .with_context(|| format!("{}: {a} has no lora_B partner", weights.display()))?;
            pairs.insert(base, (a, b));
        }
        if let Some(orphan) = b_of.values().next() {
            bail!("{}: {orphan} has no lora_A partner", weights.display());
        }
        Ok(LoraAdapter {
            dir: dir.to_path_buf(),
            r,
            lora_alpha,
            use_rslora,
            base_model,
            tensors,
            pairs,
            replacements,
        })
    }

    /// PEFT's scaling: alpha / r, or alpha / √r with rsLoRA.
    pub fn scale(&self) -> f32 {
        if self.use_rslora {
            (self.lora_alpha / (self.r as f64).sqrt()) as f32
        } else {
            (self.lora_alpha / self.r as f64) as f32
        }
    }

    /// Base weights that have an update.
    pub fn targets(&self) -> impl Iterator<Item = &str> {
        self.pairs.keys().map(String::as_str)
    }

    pub fn replaced(&self) -> impl Iterator<Item = &str> {
        self.replacements.keys().map(String::as_str)
    }

    /// The update for base weight `name` of shape `[out, in]`, if the adapter has one.
    pub fn delta(&self, name: &str, shape: &[usize]) -> Result<Option<LoraDelta>> {
        let Some((a_name, b_name)) = self.pairs.get(name) else {
            return Ok(None);
        };
        let (a_shape, b_shape) = (
            &self.tensors.meta(a_name).unwrap().shape,
            &self.tensors.meta(b_name).unwrap().shape,
        );
        let &[out, inp] = shape else {
            bail!("{name}: LoRA targets a {}-D weight", shape.len());
        };
        if a_shape.as_slice() != [self.r, inp] || b_shape.as_slice() != [out, self.r] {
            bail!(
                "{}: {name} is [{out}, {inp}] but lora_A is {a_shape:?} and lora_B {b_shape:?} (r = {}); the adapter belongs to another base model",
                self.dir.display(),
                self.r
            );
        }
        Ok(Some(LoraDelta {
            a: self.tensors.read_f32(a_name)?,
            b: self.tensors.read_f32(b_name)?,
            r: self.r,
            scale: self.scale(),
        }))
    }

    /// A trained tensor that replaces base tensor `name` (biases), if any.
    pub fn replacement(&self, name: &str) -> Result<Option<Vec<f32>>> {
        match self.replacements.get(name) {
            Some(n) => Ok(Some(self.tensors.read_f32(n)?)),
            None => Ok(None),
        }
    }
}
