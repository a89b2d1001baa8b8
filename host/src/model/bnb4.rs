//! Pre-quantised bitsandbytes 4-bit base models (`*-bnb-4bit` repositories such as
//! `unsloth/llama-3-8b-bnb-4bit`): detection and validation.
//!
//! Such a checkpoint says so in `config.json` (`quantization_config` with `quant_method:
//! bitsandbytes`, `load_in_4bit`, `bnb_4bit_quant_type`, …) and stores each quantised linear as
//! packed NF4 codes plus companion tensors (absmax, maps, a JSON quant state); embeddings,
//! norms, `lm_head` and `llm_int8_skip_modules` stay 16-bit. The tensor layout itself is defined
//! once, beside the `merged_4bit` writer, in [`crate::export::bnb_nf4`]; this module decides
//! which tensors are 4-bit and whether the checkpoint is one ferrotune loads exactly: NF4 only
//! (the QLoRA type; fp4 is refused), blocks of 64, double-quantised or plain absmax, uint8
//! storage, every quant state consistent with config.json.
//!
//! Each engine then takes the weights its own way: the cpu engine dequantises them exactly as
//! `bnb.functional.dequantize_4bit` does ([`crate::model::Weights`]), the cuda engine uploads
//! the codes and absmax as they are, and the 16-bit exports dequantise like the cpu engine.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::export::bnb_nf4::{
    self, Nf4Absmax, Nf4Weight, RawTensor, COMPANIONS, FP4_QUANT_STATE_KEY, QUANT_STATE_KEY,
};

/// What `quantization_config` in config.json says about a bitsandbytes 4-bit checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Bnb4Config {
    /// `bnb_4bit_use_double_quant`.
    pub double_quant: bool,
    /// `bnb_4bit_compute_dtype` (`bfloat16`, `float16`, …), if given.
    pub compute_dtype: Option<String>,
    /// `llm_int8_skip_modules` as stored (`null` or a list of module names).
    pub skip_modules: Value,
}

impl Bnb4Config {
    /// The `quantization_config` of `dir/config.json` (`Ok(None)`: a 16-bit model).
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let json: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_config(&json, &path)
    }

    /// Parses `quantization_config` (`path` names config.json in errors). `Ok(None)`: the
    /// config has none, the weights are 16/32-bit.
    pub fn from_config(config: &Value, path: &Path) -> Result<Option<Self>> {
        let Some(qc) = config.get("quantization_config").filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let at = |key: &str| format!("{}: quantization_config.{key}", path.display());
        let method = qc.get("quant_method").and_then(Value::as_str).unwrap_or("");
        if method != "bitsandbytes" {
            bail!(
                "{} {method:?} is not supported: ferrotune loads 16-bit weights (quantised with \
                 --load_in_4bit) or bitsandbytes NF4 checkpoints (*-bnb-4bit)",
                at("quant_method")
            );
        }
        let flag = |key: &str| {
            qc.get(key)
                .or_else(|| qc.get(format!("_{key}")))
                .and_then(Value::as_bool)
                .unwrap_or(false)
        };
        if flag("load_in_8bit") {
            bail!(
                "{} is true: 8-bit bitsandbytes checkpoints are not supported; use the 16-bit \
                 model (with --load_in_4bit for QLoRA) or its *-bnb-4bit version",
                at("load_in_8bit")
            );
        }
        if !flag("load_in_4bit") {
            bail!(
                "{} is not true: ferrotune loads bitsandbytes 4-bit (NF4) checkpoints only",
                at("load_in_4bit")
            );
        }
        // transformers' BitsAndBytesConfig defaults to fp4 when the key is absent.
        let quant_type = qc
            .get("bnb_4bit_quant_type")
            .and_then(Value::as_str)
            .unwrap_or("fp4");
        if quant_type != "nf4" {
            bail!(
                "{} is {quant_type:?}: only NF4 4-bit checkpoints load (the QLoRA type); use the \
                 16-bit model with --load_in_4bit, which quantises it to NF4",
                at("bnb_4bit_quant_type")
            );
        }
        if let Some(storage) = qc
            .get("bnb_4bit_quant_storage")
            .and_then(Value::as_str)
            .filter(|s| *s != "uint8")
        {
            bail!(
                "{} is {storage:?}: only uint8 storage (bitsandbytes' default) loads",
                at("bnb_4bit_quant_storage")
            );
        }
        Ok(Some(Bnb4Config {
            double_quant: flag("bnb_4bit_use_double_quant"),
            compute_dtype: qc
                .get("bnb_4bit_compute_dtype")
                .and_then(Value::as_str)
                .map(str::to_string),
            skip_modules: qc
                .get("llm_int8_skip_modules")
                .cloned()
                .unwrap_or(Value::Null),
        }))
    }
}

/// A pre-quantised base: its config and which of its weights are stored as NF4.
#[derive(Debug, Clone)]
pub struct Prequantized {
    pub config: Bnb4Config,
    /// Full names of the NF4 weights (`model.layers.0.self_attn.q_proj.weight`).
    pub weights: BTreeSet<String>,
    /// Where config.json is (for messages).
    config_path: std::path::PathBuf,
}

impl Prequantized {
    /// Looks at `dir/config.json` and every tensor name of the model's files: `Ok(None)` for a
    /// 16-bit model, the 4-bit weights of a bitsandbytes NF4 checkpoint, or one error line when
    /// the two disagree or the checkpoint is of a kind that does not load (fp4, 8-bit, …).
    pub fn detect<'a>(
        dir: &Path,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<Option<Self>> {
        let path = dir.join("config.json");
        let config = Bnb4Config::from_dir(dir)?;
        let names: BTreeSet<&str> = names.into_iter().collect();
        let mut weights = BTreeSet::new();
        for name in &names {
            if let Some(w) = name.strip_suffix(&format!(".{QUANT_STATE_KEY}")) {
                weights.insert(w.to_string());
            } else if name.ends_with(&format!(".{FP4_QUANT_STATE_KEY}")) {
                bail!(
                    "{}: {name} is a bitsandbytes fp4 weight; only NF4 4-bit checkpoints load",
                    dir.display()
                );
            }
        }
        // A companion without its quant state would leave packed codes looking like a plain
        // uint8 tensor: refuse rather than guess.
        for name in &names {
            for suffix in COMPANIONS {
                if let Some(w) = name.strip_suffix(&format!(".{suffix}")) {
                    if w.ends_with(".weight") && !weights.contains(w) {
                        bail!(
                            "{}: {name} is stored without {w}.{QUANT_STATE_KEY}: an incomplete \
                             bitsandbytes 4-bit weight (re-download the checkpoint)",
                            dir.display()
                        );
                    }
                }
            }
        }
        match (config, weights.is_empty()) {
            (None, true) => Ok(None),
            (None, false) => bail!(
                "{}: no quantization_config, but {} is stored 4-bit (bitsandbytes); the config \
                 and the weights do not belong together",
                path.display(),
                weights.first().expect("non-empty")
            ),
            (Some(_), true) => bail!(
                "{}: quantization_config declares a bitsandbytes 4-bit model, but no tensor has \
                 a .{QUANT_STATE_KEY}; the weights are not the quantised ones",
                path.display()
            ),
            (Some(config), false) => {
                if let Some(missing) = weights.iter().find(|w| !names.contains(w.as_str())) {
                    bail!(
                        "{}: {missing}.{QUANT_STATE_KEY} is stored but {missing} (the packed \
                         codes) is not",
                        dir.display()
                    );
                }
                Ok(Some(Prequantized {
                    config,
                    weights,
                    config_path: path,
                }))
            }
        }
    }

    /// Whether tensor `name` is an NF4 weight (packed codes).
    pub fn is_nf4(&self, name: &str) -> bool {
        self.weights.contains(name)
    }

    /// Whether `name` is stored beside a 4-bit weight (absmax, maps, quant state) rather than
    /// being a tensor of the model.
    pub fn is_companion(&self, name: &str) -> bool {
        COMPANIONS.iter().any(|suffix| {
            name.strip_suffix(suffix)
                .and_then(|w| w.strip_suffix('.'))
                .is_some_and(|w| self.weights.contains(w))
        })
    }

    /// Reads NF4 weight `name` (see [`Nf4Weight::read`]) and checks it against config.json:
    /// the shape the architecture implies (`shape`, when the caller knows it) and the absmax
    /// kind `bnb_4bit_use_double_quant` declares.
    pub fn read<'a>(
        &self,
        name: &str,
        shape: Option<&[usize]>,
        get: impl Fn(&str) -> Result<Option<RawTensor<'a>>>,
    ) -> Result<Nf4Weight> {
        let w = Nf4Weight::read(name, get)?;
        if let Some(shape) = shape.filter(|s| *s != w.shape.as_slice()) {
            bail!(
                "weight {name:?} has shape {:?} (its 4-bit quant state) but config.json implies \
                 {shape:?}",
                w.shape
            );
        }
        let double = matches!(w.absmax, Nf4Absmax::Double(_));
        if double != self.config.double_quant {
            bail!(
                "{name}: absmax is {} but {} sets bnb_4bit_use_double_quant {}",
                if double {
                    "double-quantised"
                } else {
                    "plain f32"
                },
                self.config_path.display(),
                self.config.double_quant
            );
        }
        Ok(w)
    }

    /// The one line the loaders log: what is 4-bit and how it is used.
    pub fn describe(&self, dir: &Path, how: &str) -> String {
        format!(
            "{}: pre-quantised bitsandbytes NF4 checkpoint ({} 4-bit weights, {} absmax); {how}",
            dir.display(),
            self.weights.len(),
            if self.config.double_quant {
                "double-quantised"
            } else {
                "plain"
            }
        )
    }
}

/// Writes `src` (a 16-bit model directory) to `dst` as a pre-quantised bitsandbytes NF4
/// checkpoint, the layout of a `*-bnb-4bit` repository: every decoder linear through the
/// `merged_4bit` writer (double-quantised absmax, or plain with `double_quant: false`), all
/// other tensors as stored, `quantization_config` in config.json. For tests and benchmarks;
/// real checkpoints come from bitsandbytes or `--save_method merged_4bit`.
pub fn write_prequantized(src: &Path, dst: &Path, double_quant: bool) -> Result<()> {
    use crate::export::safetensors_dir::SafetensorsDir;
    use crate::gguf::convert::TensorSource;
    std::fs::create_dir_all(dst).with_context(|| format!("cannot create {}", dst.display()))?;
    let base = SafetensorsDir::open_model_dir(src)?;
    let mut stored = Vec::new();
    let mut linear_dtype = None;
    for meta in base.metas() {
        if bnb_nf4::is_decoder_linear(&meta.name, &meta.shape) {
            let values = base.read_f32(&meta.name)?;
            let q = if double_quant {
                Nf4Weight::quantize(&values, &meta.shape, meta.dtype)?
            } else {
                Nf4Weight::quantize_plain(&values, &meta.shape, meta.dtype)?
            };
            linear_dtype.get_or_insert(meta.dtype);
            stored.extend(q.tensors(&meta.name));
        } else {
            stored.push(bnb_nf4::StoredTensor {
                name: meta.name.clone(),
                dtype: meta.dtype.name(),
                shape: meta.shape.clone(),
                bytes: base.bytes(&meta.name)?,
            });
        }
    }
    let views = stored
        .iter()
        .map(|t| {
            let dtype = match t.dtype {
                "U8" => safetensors::Dtype::U8,
                "F32" => safetensors::Dtype::F32,
                "F16" => safetensors::Dtype::F16,
                _ => safetensors::Dtype::BF16,
            };
            let view = safetensors::tensor::TensorView::new(dtype, t.shape.clone(), &t.bytes)?;
            Ok((t.name.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(views, Some(meta), &dst.join("model.safetensors"))?;
    for entry in std::fs::read_dir(src)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default();
        let weights = path.extension().is_some_and(|e| e == "safetensors")
            || name == "model.safetensors.index.json";
        if path.is_file() && !weights && name != "config.json" {
            std::fs::copy(&path, dst.join(name))?;
        }
    }
    let mut config: Value = serde_json::from_slice(&std::fs::read(src.join("config.json"))?)?;
    let dtype = bnb_nf4::torch_dtype_name(
        linear_dtype.unwrap_or(crate::export::safetensors_dir::StoreDtype::BF16),
    );
    let mut qc = bnb_nf4::quantization_config(dtype);
    qc["bnb_4bit_use_double_quant"] = double_quant.into();
    config["quantization_config"] = qc;
    std::fs::write(
        dst.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests;
