//! A model's architecture, read from Hugging Face's `config.json`.
//!
//! One struct covers every supported family because they share the decoder: pre-norm blocks of
//! RMSNorm → GQA attention with RoPE → RMSNorm → SwiGLU MLP. The families differ only in flags
//! recorded here (projection biases, per-head q/k norms, rope scaling, tied embeddings).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

/// `model_type` values this build trains, as they appear in `config.json`.
pub const SUPPORTED_MODEL_TYPES: [&str; 4] = ["llama", "mistral", "qwen2", "qwen3"];

/// How RoPE frequencies are scaled for long contexts (`rope_scaling` in `config.json`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1/3.2: low frequencies divided by `factor`, high ones kept, a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The decoder architecture of a supported model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    /// The LM head reuses the embedding matrix (`tie_word_embeddings`).
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2 always; Llama/Qwen3 with `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (Llama/Qwen3 `attention_bias`).
    pub o_bias: bool,
    /// gate/up/down projections carry a bias (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm on queries and keys before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Mistral's sliding attention window: a token sees at most this many tokens (itself included).
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

/// The raw fields we read; everything else in `config.json` is ignored.
#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    pad_token_id: Option<Value>,
}

impl ModelConfig {
    /// The RoPE stretch unsloth-cli.py applies when `--max_seq_length` exceeds this model's
    /// window: every frequency divided by `max_seq_length / max_position_embeddings` (linear
    /// "kaiokendev" scaling, for every sample, short ones too). `None` when it applies none:
    /// within the window, or with Llama 3.1-style scaling, which it keeps as is.
    pub fn unsloth_rope_stretch(&self, max_seq_length: usize) -> Option<f64> {
        let window = self.max_position_embeddings;
        let stretches = max_seq_length > window && window > 0;
        (stretches && !matches!(self.rope_scaling, RopeScaling::Llama3 { .. }))
            .then(|| max_seq_length as f64 / window as f64)
    }

    /// This config as unsloth-cli.py trains it at `max_seq_length`: RoPE stretched by
    /// [`Self::unsloth_rope_stretch`] where that applies, and the window widened to
    /// `max_seq_length` when it is longer.
    pub fn for_max_seq_length(mut self, max_seq_length: usize) -> Self {
        if let Some(factor) = self.unsloth_rope_stretch(max_seq_length) {
            self.rope_scaling = RopeScaling::Linear { factor };
        }
        self.max_position_embeddings = self.max_position_embeddings.max(max_seq_length);
        self
    }

    /// Reads and validates `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {}: a model directory needs the Hugging Face config.json",
                path.display()
            )
        })?;
        Self::from_json_str(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Parses the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).context("config.json is not valid JSON")?;
        let model_type = raw
            .model_type
            .clone()
            .context("config.json has no \"model_type\"; it must name the architecture")?;
        if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
            bail!(
                "model_type {model_type:?} is not supported; supported architectures: {}",
                SUPPORTED_MODEL_TYPES.join(", ")
            );
        }
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                bail!("hidden_act {act:?} is not supported; the {model_type} MLP here is SwiGLU (silu)");
            }
        }
        let need = |v: Option<usize>, key: &str| {
            v.filter(|&n| n > 0)
                .with_context(|| format!("config.json needs a positive \"{key}\""))
        };
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_attention_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            bail!(
                "num_attention_heads ({num_attention_heads}) must be a multiple of \
                 num_key_value_heads ({num_key_value_heads})"
            );
        }
        let head_dim = match raw.head_dim {
            Some(d) if d > 0 => d,
            _ => {
                if hidden_size % num_attention_heads != 0 {
                    bail!("hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_attention_heads}) and no head_dim is given");
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            bail!("head_dim ({head_dim}) must be even for rotary embeddings");
        }
        let is = |t: &str| model_type == t;
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let sliding_window = if is("mistral") {
            raw.sliding_window
        } else if raw.use_sliding_window.unwrap_or(false) {
            bail!("use_sliding_window=true ({model_type}) is not supported; train with a config that sets it false");
        } else {
            None
        };
        Ok(ModelConfig {
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rope_scaling: parse_rope_scaling(raw.rope_scaling.as_ref())?,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: is("qwen2") || attention_bias,
            o_bias: !is("qwen2") && attention_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            qk_norm: is("qwen3"),
            sliding_window,
            bos_token_id: token_ids(raw.bos_token_id.as_ref(), "bos_token_id")?
                .first()
                .copied(),
            eos_token_ids: token_ids(raw.eos_token_id.as_ref(), "eos_token_id")?,
            pad_token_id: token_ids(raw.pad_token_id.as_ref(), "pad_token_id")?
                .first()
                .copied(),
            model_type,
        })
    }

    /// Attention heads that share one key/value head.
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// `(in_features, out_features)` of a projection, by its PEFT/HF name (`q_proj` … `down_proj`).
    pub fn projection_shape(&self, proj: &str) -> Option<(usize, usize)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let (q, kv) = (
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
        );
        Some(match proj {
            "q_proj" => (h, q),
            "k_proj" | "v_proj" => (h, kv),
            "o_proj" => (q, h),
            "gate_proj" | "up_proj" => (h, i),
            "down_proj" => (i, h),
            _ => return None,
        })
    }

    /// Whether a projection has a bias in this architecture.
    pub fn projection_has_bias(&self, proj: &str) -> bool {
        match proj {
            "q_proj" | "k_proj" | "v_proj" => self.qkv_bias,
            "o_proj" => self.o_bias,
            _ => self.mlp_bias,
        }
    }
}

/// `rope_scaling` may be null, `{"type"|"rope_type": "default"|"linear"|"llama3", ...}`.
fn parse_rope_scaling(value: Option<&Value>) -> Result<RopeScaling> {
    let Some(obj) = value.filter(|v| !v.is_null()) else {
        return Ok(RopeScaling::None);
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| {
        obj.get(key)
            .and_then(Value::as_f64)
            .with_context(|| format!("rope_scaling of type {kind:?} needs a numeric \"{key}\""))
    };
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        other => bail!(
            "rope_scaling type {other:?} is not supported; supported: default, linear, llama3"
        ),
    })
}

/// A token id field may be absent, null, a number or a list of numbers.
fn token_ids(value: Option<&Value>, key: &str) -> Result<Vec<u32>> {
    let as_id = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .with_context(|| format!("config.json \"{key}\" must be a token id or a list of them"))
    };
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(as_id).collect(),
        Some(v) => Ok(vec![as_id(v)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsloth_stretches_rope_only_past_the_window_and_never_llama3_scaling() {
        let mut c = ModelConfig::from_json_str(&llama("")).unwrap();
        c.max_position_embeddings = 4096;
        assert_eq!(c.unsloth_rope_stretch(4096), None);
        assert_eq!(c.unsloth_rope_stretch(10240), Some(2.5));
        c.rope_scaling = RopeScaling::Linear { factor: 2.0 };
        assert_eq!(c.unsloth_rope_stretch(8192), Some(2.0));
        c.rope_scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        assert_eq!(c.unsloth_rope_stretch(1 << 20), None);
        // Applied: the stretch and the wider window; llama3 scaling keeps its frequencies.
        let llama3 = c.rope_scaling.clone();
        let wide = c.clone().for_max_seq_length(1 << 20);
        assert_eq!(
            (wide.rope_scaling, wide.max_position_embeddings),
            (llama3, 1 << 20)
        );
        let mut plain = ModelConfig::from_json_str(&llama("")).unwrap();
        plain.max_position_embeddings = 4096;
        let s = plain.clone().for_max_seq_length(10240);
        assert_eq!(s.rope_scaling, RopeScaling::Linear { factor: 2.5 });
        assert_eq!(s.max_position_embeddings, 10240);
        assert_eq!(plain.clone().for_max_seq_length(2048), plain);
    }

    fn llama(extra: &str) -> String {
        format!(
            r#"{{"model_type":"llama","vocab_size":128,"hidden_size":64,"intermediate_size":96,
               "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
               "rms_norm_eps":1e-5,"rope_theta":500000.0,"hidden_act":"silu",
               "bos_token_id":1,"eos_token_id":[2,3]{extra}}}"#
        )
    }

    #[test]
    fn llama_with_gqa_and_llama3_rope_scaling() {
        let c = ModelConfig::from_json_str(&llama(
            r#","rope_scaling":{"factor":32.0,"high_freq_factor":4.0,"low_freq_factor":1.0,
                "original_max_position_embeddings":8192,"rope_type":"llama3"},"tie_word_embeddings":true"#,
        ))
        .unwrap();
        assert_eq!(
            (c.head_dim, c.group_size(), c.num_key_value_heads),
            (16, 2, 2)
        );
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert!(c.tie_word_embeddings && !c.qkv_bias && !c.qk_norm);
        assert_eq!(c.eos_token_ids, vec![2, 3]);
        assert_eq!(c.bos_token_id, Some(1));
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 32.0));
        assert_eq!(c.projection_shape("k_proj"), Some((64, 32)));
    }

    #[test]
    fn qwen2_has_qkv_bias_and_qwen3_has_qk_norm_with_explicit_head_dim() {
        let q2 = llama("").replace("\"llama\"", "\"qwen2\"");
        let c = ModelConfig::from_json_str(&q2).unwrap();
        assert!(c.qkv_bias && !c.o_bias && !c.qk_norm);
        let q3 = llama(r#","head_dim":32"#).replace("\"llama\"", "\"qwen3\"");
        let c = ModelConfig::from_json_str(&q3).unwrap();
        assert!(c.qk_norm && !c.qkv_bias);
        assert_eq!(c.head_dim, 32);
        assert_eq!(c.projection_shape("q_proj"), Some((64, 128)));
        assert_eq!(c.projection_shape("o_proj"), Some((128, 64)));
    }

    #[test]
    fn mistral_keeps_its_sliding_window_and_linear_scaling_parses() {
        let m = llama(r#","sliding_window":4096,"rope_scaling":{"type":"linear","factor":2.0}"#)
            .replace("\"llama\"", "\"mistral\"");
        let c = ModelConfig::from_json_str(&m).unwrap();
        assert_eq!(c.sliding_window, Some(4096));
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
    }

    #[test]
    fn unsupported_model_type_lists_the_supported_ones() {
        let err = ModelConfig::from_json_str(&llama("").replace("\"llama\"", "\"gpt2\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"gpt2\"") && err.contains("llama, mistral, qwen2, qwen3"),
            "{err}"
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let err = ModelConfig::from_json_str(&llama(
            r#","rope_scaling":{"rope_type":"yarn","factor":4}"#,
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("yarn"), "{err}");
        let err = ModelConfig::from_json_str(
            &llama("").replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("num_key_value_heads"), "{err}");
        let err = ModelConfig::from_json_str(&llama("").replace("\"silu\"", "\"gelu\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("gelu"), "{err}");
    }
}
