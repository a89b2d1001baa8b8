//! A model's `general.*` and `<arch>.*` GGUF keys, the GGUF architecture of each Hugging Face
//! `model_type`, and llama.cpp's `rope_freqs` tensor for Llama 3.1-style rope scaling.

use anyhow::{bail, Result};

use super::preset::{ModelShape, Preset};
use super::value::Value;
use crate::model::config::{ModelConfig, RopeScaling};

/// GGML quantization format version (`GGML_QNT_VERSION`).
pub const QUANTIZATION_VERSION: u32 = 2;

/// How one Hugging Face architecture is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgufArch {
    /// `general.architecture` and the prefix of the hyper-parameter keys.
    pub name: &'static str,
    /// llama.cpp's llama converter permutes q/k rows (`undo_permute`); qwen's does not, since
    /// those models use NeoX-style RoPE in ggml.
    pub permute_qk: bool,
}

pub fn arch_for(model_type: &str) -> Result<GgufArch> {
    Ok(match model_type {
        // llama.cpp converts Mistral checkpoints with its llama class, as architecture llama.
        "llama" | "mistral" => GgufArch {
            name: "llama",
            permute_qk: true,
        },
        "qwen2" => GgufArch {
            name: "qwen2",
            permute_qk: false,
        },
        "qwen3" => GgufArch {
            name: "qwen3",
            permute_qk: false,
        },
        other => bail!(
            "model_type {other:?} has no GGUF export here; supported: llama, mistral, qwen2, qwen3"
        ),
    })
}

pub fn model_shape(cfg: &ModelConfig, arch: GgufArch, tied_embeddings: bool) -> ModelShape {
    let n = cfg.num_hidden_layers;
    let is_70b = n == 80
        && match arch.name {
            "llama" => cfg.num_attention_heads != cfg.num_key_value_heads,
            "qwen2" => true,
            _ => false,
        };
    ModelShape {
        n_layer: n,
        n_head: cfg.num_attention_heads,
        n_head_kv: cfg.num_key_value_heads,
        tied_embeddings,
        is_70b,
    }
}

/// llama.cpp's size label: parameters with one decimal and K/M/B/T (`8.0B`, `135M`).
pub fn size_label(params: u64) -> String {
    let p = params as f64;
    let (div, unit) = if p >= 1e12 {
        (1e12, "T")
    } else if p >= 1e9 {
        (1e9, "B")
    } else if p >= 1e6 {
        (1e6, "M")
    } else {
        (1e3, "K")
    };
    format!("{:.1}{unit}", p / div)
}

/// `general.*` and `<arch>.*` keys, in the order llama.cpp's converter writes them.
pub fn model_metadata(
    cfg: &ModelConfig,
    arch: GgufArch,
    preset: Preset,
    name: &str,
    params: u64,
) -> Vec<(String, Value)> {
    let a = arch.name;
    let k = |key: &str| format!("{a}.{key}");
    let u = |v: usize| Value::U32(v as u32);
    let mut m: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        ("general.type".into(), Value::String("model".into())),
        ("general.name".into(), Value::String(name.into())),
        (
            "general.size_label".into(),
            Value::String(size_label(params)),
        ),
        (k("block_count"), u(cfg.num_hidden_layers)),
        (k("context_length"), u(cfg.max_position_embeddings)),
        (k("embedding_length"), u(cfg.hidden_size)),
        (k("feed_forward_length"), u(cfg.intermediate_size)),
        (k("attention.head_count"), u(cfg.num_attention_heads)),
        (k("attention.head_count_kv"), u(cfg.num_key_value_heads)),
    ];
    if let RopeScaling::Linear { factor } = cfg.rope_scaling {
        m.push((k("rope.scaling.type"), Value::String("linear".into())));
        m.push((k("rope.scaling.factor"), Value::F32(factor as f32)));
    }
    m.push((k("rope.freq_base"), Value::F32(cfg.rope_theta as f32)));
    m.push((
        k("attention.layer_norm_rms_epsilon"),
        Value::F32(cfg.rms_norm_eps as f32),
    ));
    m.push((k("attention.key_length"), u(cfg.head_dim)));
    m.push((k("attention.value_length"), u(cfg.head_dim)));
    m.push(("general.file_type".into(), Value::U32(preset.file_type())));
    if a == "llama" {
        m.push((k("vocab_size"), u(cfg.vocab_size)));
        m.push((k("rope.dimension_count"), u(cfg.head_dim)));
    }
    m.push((
        "general.quantization_version".into(),
        Value::U32(QUANTIZATION_VERSION),
    ));
    m.push((
        "general.alignment".into(),
        Value::U32(super::writer::DEFAULT_ALIGNMENT as u32),
    ));
    m
}

/// Llama 3.1 rope scaling as per-frequency divisors (`rope_freqs.weight`, head_dim / 2 values),
/// computed as llama.cpp's converter does (`LlamaModel.generate_extra_tensors`).
pub fn rope_freqs(cfg: &ModelConfig, arch: GgufArch) -> Option<Vec<f32>> {
    if arch.name != "llama" {
        return None;
    }
    llama3_freq_factors(cfg.head_dim, cfg.rope_theta, &cfg.rope_scaling)
}

/// The wavelength of each rotary frequency pair, in positions: `2π / θ^(-2i/d)` with the
/// frequency in f32, as torch computes it.
pub fn rope_wavelengths(head_dim: usize, rope_theta: f64) -> Vec<f64> {
    let base = rope_theta as f32;
    (0..head_dim / 2)
        .map(|i| {
            // torch: base ** (arange(0, dim, 2, float32) / dim), in f32.
            let freq = 1.0 / base.powf((2 * i) as f32 / head_dim as f32);
            2.0 * std::f64::consts::PI / freq as f64
        })
        .collect()
}

/// The divisor of each rotary frequency under Llama 3.1 scaling (`None` for other scalings).
/// The GGUF base loader checks the parameters it recovers from a `rope_freqs` tensor with it.
pub fn llama3_freq_factors(
    head_dim: usize,
    rope_theta: f64,
    scaling: &RopeScaling,
) -> Option<Vec<f32>> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings: old_ctx,
    } = *scaling
    else {
        return None;
    };
    let low_wavelen = old_ctx / low_freq_factor;
    let high_wavelen = old_ctx / high_freq_factor;
    Some(
        rope_wavelengths(head_dim, rope_theta)
            .into_iter()
            .map(|wavelen| {
                let f = if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    factor
                } else {
                    let smooth = (old_ctx / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                };
                f as f32
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> ModelConfig {
        ModelConfig::from_json_str(&format!(
            r#"{{"model_type":"llama","vocab_size":128256,"hidden_size":4096,"intermediate_size":14336,
            "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"rms_norm_eps":1e-5,
            "rope_theta":500000.0,"max_position_embeddings":131072{extra}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn llama_3_1_rope_freqs_follow_the_converter() {
        let cfg = config(
            r#","rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
        );
        let f = rope_freqs(&cfg, arch_for("llama").unwrap()).unwrap();
        assert_eq!(f.len(), 64);
        assert_eq!(f[0], 1.0, "high frequencies are kept");
        assert_eq!(f[63], 8.0, "low frequencies are divided by factor");
        assert!(f.windows(2).all(|w| w[0] <= w[1]), "monotone blend");
        assert!(rope_freqs(&config(""), arch_for("llama").unwrap()).is_none());
    }

    #[test]
    fn metadata_has_the_llama_keys() {
        let cfg = config("");
        let m = model_metadata(
            &cfg,
            arch_for("mistral").unwrap(),
            Preset::Q4KM,
            "x",
            8_030_261_248,
        );
        let get = |k: &str| {
            m.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(get("general.architecture"), Value::String("llama".into()));
        assert_eq!(get("general.size_label"), Value::String("8.0B".into()));
        assert_eq!(get("general.file_type"), Value::U32(15));
        assert_eq!(get("llama.attention.head_count_kv"), Value::U32(8));
        assert_eq!(get("llama.rope.dimension_count"), Value::U32(128));
        assert_eq!(get("llama.rope.freq_base"), Value::F32(500000.0));
        assert_eq!(get("llama.context_length"), Value::U32(131072));
    }
}
