//! Quantization presets (`--quantization`) and the per-tensor type each one picks.
//!
//! The choice follows llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp) for the
//! architectures written here (llama, qwen2, qwen3; dense, no experts, no importance matrix):
//! - 1-D tensors, biases and `*_norm.weight` stay F32 (as `convert_hf_to_gguf.py` writes them).
//! - f32 / f16 / bf16 / q8_0: every other tensor takes the preset's type.
//! - The other presets start from their base type, then:
//!   - `output.weight` (or `token_embd.weight` when embeddings are tied): Q6_K, or Q8_0 when the
//!     row length does not fit the base type's block; unchanged for q8_0.
//!   - `attn_v`: q2_k → Q4_K if n_head/n_head_kv ≥ 4 else Q3_K; q3_k_m → Q5_K for the first
//!     two layers, Q4_K after; q3_k_l → Q5_K; q4_k_m / q5_k_m → Q6_K on "more bits" layers
//!     (`use_more_bits`: the first and last eighth of the layers and every third in between);
//!     q4_k_s → Q5_K for the first four layers; then a 70B-class model (80 layers) lifts Q3_K
//!     and Q4_K to Q5_K.
//!   - `ffn_down`: q2_k → Q3_K; q3_k_m → Q5_K in the first 1/16 of the layers, else Q4_K;
//!     q3_k_l → Q5_K; q4_k_m / q5_k_m → Q6_K on "more bits" layers; q4_k_s → Q5_K in the
//!     first 1/8.
//!   - `attn_output`: q2_k → Q3_K; q3_k_m → Q4_K; q3_k_l → Q5_K.
//!   - A row length that does not fit the chosen type falls back: Q2_K/Q3_K → Q4_0,
//!     Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, and F16 when even 32 does not divide it.
//!
//! `general.file_type` is llama.cpp's `llama_ftype` of the preset.

use anyhow::{bail, Result};

use super::types::GgmlType;

/// Every `--quantization` value and alias, as the CLI lists them.
pub const PRESET_NAMES: [&str; 20] = [
    "f32",
    "f16",
    "bf16",
    "q8_0",
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "q2_k",
    "q3_k_s",
    "q3_k_m",
    "q3_k_l",
    "q4_k_s",
    "q4_k_m",
    "q5_k_s",
    "q5_k_m",
    "q6_k",
    "not_quantized",
    "fast_quantized",
    "quantized",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q2K,
    Q3KS,
    Q3KM,
    Q3KL,
    Q4KS,
    Q4KM,
    Q5KS,
    Q5KM,
    Q6K,
}

impl Preset {
    /// Parses a preset name; unsloth's aliases map as unsloth maps them
    /// (not_quantized → f16, fast_quantized → q8_0, quantized → q4_k_m).
    pub fn parse(name: &str) -> Result<Preset> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "f32" => Preset::F32,
            "f16" | "not_quantized" => Preset::F16,
            "bf16" => Preset::Bf16,
            "q8_0" | "fast_quantized" => Preset::Q8_0,
            "q4_0" => Preset::Q4_0,
            "q4_1" => Preset::Q4_1,
            "q5_0" => Preset::Q5_0,
            "q5_1" => Preset::Q5_1,
            "q2_k" => Preset::Q2K,
            "q3_k_s" => Preset::Q3KS,
            "q3_k_m" | "q3_k" => Preset::Q3KM,
            "q3_k_l" => Preset::Q3KL,
            "q4_k_s" => Preset::Q4KS,
            "q4_k_m" | "q4_k" | "quantized" => Preset::Q4KM,
            "q5_k_s" => Preset::Q5KS,
            "q5_k_m" | "q5_k" => Preset::Q5KM,
            "q6_k" => Preset::Q6K,
            other => bail!(
                "--quantization {other:?} is not a GGUF preset this build writes; use one of {}",
                PRESET_NAMES.join(", ")
            ),
        })
    }

    /// Upper-case name used in file names (`model.Q4_K_M.gguf`), as llama.cpp names them.
    pub fn file_tag(self) -> &'static str {
        match self {
            Preset::F32 => "F32",
            Preset::F16 => "F16",
            Preset::Bf16 => "BF16",
            Preset::Q8_0 => "Q8_0",
            Preset::Q4_0 => "Q4_0",
            Preset::Q4_1 => "Q4_1",
            Preset::Q5_0 => "Q5_0",
            Preset::Q5_1 => "Q5_1",
            Preset::Q2K => "Q2_K",
            Preset::Q3KS => "Q3_K_S",
            Preset::Q3KM => "Q3_K_M",
            Preset::Q3KL => "Q3_K_L",
            Preset::Q4KS => "Q4_K_S",
            Preset::Q4KM => "Q4_K_M",
            Preset::Q5KS => "Q5_K_S",
            Preset::Q5KM => "Q5_K_M",
            Preset::Q6K => "Q6_K",
        }
    }

    /// llama.cpp's `llama_ftype`, stored as `general.file_type`.
    pub fn file_type(self) -> u32 {
        match self {
            Preset::F32 => 0,
            Preset::F16 => 1,
            Preset::Q4_0 => 2,
            Preset::Q4_1 => 3,
            Preset::Q8_0 => 7,
            Preset::Q5_0 => 8,
            Preset::Q5_1 => 9,
            Preset::Q2K => 10,
            Preset::Q3KS => 11,
            Preset::Q3KM => 12,
            Preset::Q3KL => 13,
            Preset::Q4KS => 14,
            Preset::Q4KM => 15,
            Preset::Q5KS => 16,
            Preset::Q5KM => 17,
            Preset::Q6K => 18,
            Preset::Bf16 => 32,
        }
    }

    /// The type most tensors get (llama.cpp's `llama_ftype_get_default_type`).
    pub fn base_type(self) -> GgmlType {
        match self {
            Preset::F32 => GgmlType::F32,
            Preset::F16 => GgmlType::F16,
            Preset::Bf16 => GgmlType::BF16,
            Preset::Q8_0 => GgmlType::Q8_0,
            Preset::Q4_0 => GgmlType::Q4_0,
            Preset::Q4_1 => GgmlType::Q4_1,
            Preset::Q5_0 => GgmlType::Q5_0,
            Preset::Q5_1 => GgmlType::Q5_1,
            Preset::Q2K => GgmlType::Q2_K,
            Preset::Q3KS | Preset::Q3KM | Preset::Q3KL => GgmlType::Q3_K,
            Preset::Q4KS | Preset::Q4KM => GgmlType::Q4_K,
            Preset::Q5KS | Preset::Q5KM => GgmlType::Q5_K,
            Preset::Q6K => GgmlType::Q6_K,
        }
    }
}

/// What the per-tensor rules need to know about the model.
#[derive(Debug, Clone, Copy)]
pub struct ModelShape {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// No `output.weight`: the output projection reuses `token_embd.weight`.
    pub tied_embeddings: bool,
    /// llama.cpp's LLM_TYPE_70B (llama with 80 layers and GQA, qwen2 with 80 layers).
    pub is_70b: bool,
}

/// A tensor about to be written: its GGUF name and row-major shape.
#[derive(Debug, Clone, Copy)]
pub struct TensorSlot<'a> {
    pub name: &'a str,
    pub shape: &'a [usize],
}

fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The stored type of one tensor under `preset`.
pub fn tensor_type(preset: Preset, model: &ModelShape, t: TensorSlot<'_>) -> GgmlType {
    let quantizable =
        t.shape.len() >= 2 && t.name.ends_with("weight") && !t.name.contains("_norm.weight");
    if !quantizable {
        return GgmlType::F32;
    }
    let base = preset.base_type();
    let row = *t.shape.last().unwrap_or(&1);
    if !base.is_quantized() {
        return base;
    }
    if preset == Preset::Q8_0 {
        // convert_hf_to_gguf's q8_0 falls back to F16 when a row is not whole blocks.
        return if base.fits_row(row) {
            base
        } else {
            GgmlType::F16
        };
    }
    let layer = super::names::layer_of(t.name).unwrap_or(0);
    let n = model.n_layer;
    let is_output =
        t.name == "output.weight" || (model.tied_embeddings && t.name == "token_embd.weight");
    let chosen = if is_output {
        if !base.fits_row(row) {
            GgmlType::Q8_0
        } else {
            GgmlType::Q6_K
        }
    } else if t.name.ends_with("attn_v.weight") {
        let gqa = model.n_head / model.n_head_kv.max(1);
        let mut ty = match preset {
            Preset::Q2K if gqa >= 4 => GgmlType::Q4_K,
            Preset::Q2K => GgmlType::Q3_K,
            Preset::Q3KM if layer < 2 => GgmlType::Q5_K,
            Preset::Q3KM => GgmlType::Q4_K,
            Preset::Q3KL => GgmlType::Q5_K,
            Preset::Q4KM | Preset::Q5KM if use_more_bits(layer, n) => GgmlType::Q6_K,
            Preset::Q4KS if layer < 4 => GgmlType::Q5_K,
            _ => base,
        };
        if model.is_70b && matches!(ty, GgmlType::Q3_K | GgmlType::Q4_K) {
            ty = GgmlType::Q5_K;
        }
        ty
    } else if t.name.ends_with("ffn_down.weight") {
        match preset {
            Preset::Q2K => GgmlType::Q3_K,
            Preset::Q3KM if layer < n / 16 => GgmlType::Q5_K,
            Preset::Q3KM => GgmlType::Q4_K,
            Preset::Q3KL => GgmlType::Q5_K,
            Preset::Q4KM | Preset::Q5KM if use_more_bits(layer, n) => GgmlType::Q6_K,
            Preset::Q4KS if layer < n / 8 => GgmlType::Q5_K,
            _ => base,
        }
    } else if t.name.ends_with("attn_output.weight") {
        match preset {
            Preset::Q2K => GgmlType::Q3_K,
            Preset::Q3KM => GgmlType::Q4_K,
            Preset::Q3KL => GgmlType::Q5_K,
            _ => base,
        }
    } else {
        base
    };
    fallback(chosen, row)
}

/// llama.cpp's `tensor_type_fallback` for rows that are not whole blocks.
fn fallback(ty: GgmlType, row: usize) -> GgmlType {
    if ty.fits_row(row) {
        return ty;
    }
    let smaller = match ty {
        GgmlType::Q2_K | GgmlType::Q3_K => GgmlType::Q4_0,
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        other => other,
    };
    if smaller.fits_row(row) {
        smaller
    } else {
        GgmlType::F16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA_8B: ModelShape = ModelShape {
        n_layer: 32,
        n_head: 32,
        n_head_kv: 8,
        tied_embeddings: false,
        is_70b: false,
    };

    fn ty(preset: &str, name: &str, shape: &[usize]) -> GgmlType {
        tensor_type(
            Preset::parse(preset).unwrap(),
            &LLAMA_8B,
            TensorSlot { name, shape },
        )
    }

    #[test]
    fn aliases_map_as_unsloth_maps_them() {
        assert_eq!(Preset::parse("not_quantized").unwrap(), Preset::F16);
        assert_eq!(Preset::parse("fast_quantized").unwrap(), Preset::Q8_0);
        assert_eq!(Preset::parse("quantized").unwrap(), Preset::Q4KM);
        let err = Preset::parse("iq2_xxs").unwrap_err().to_string();
        assert!(err.contains("iq2_xxs") && err.contains("q4_k_m"), "{err}");
        for name in PRESET_NAMES {
            Preset::parse(name).unwrap();
        }
    }

    #[test]
    fn q4_k_m_matches_llama_quantize_on_a_llama_3_8b_layout() {
        let w = [4096, 4096];
        assert_eq!(
            ty("q4_k_m", "output.weight", &[128256, 4096]),
            GgmlType::Q6_K
        );
        assert_eq!(
            ty("q4_k_m", "token_embd.weight", &[128256, 4096]),
            GgmlType::Q4_K
        );
        assert_eq!(ty("q4_k_m", "output_norm.weight", &[4096]), GgmlType::F32);
        assert_eq!(ty("q4_k_m", "blk.0.attn_q.weight", &w), GgmlType::Q4_K);
        // use_more_bits(i, 32): i < 4, i >= 28, or (i - 4) % 3 == 2.
        let more: Vec<usize> = (0..32)
            .filter(|&i| {
                ty("q4_k_m", &format!("blk.{i}.attn_v.weight"), &[1024, 4096]) == GgmlType::Q6_K
            })
            .collect();
        assert_eq!(
            more,
            [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
        assert_eq!(
            ty("q4_k_m", "blk.6.ffn_down.weight", &[4096, 14336]),
            GgmlType::Q6_K
        );
        assert_eq!(
            ty("q4_k_m", "blk.7.ffn_down.weight", &[4096, 14336]),
            GgmlType::Q4_K
        );
        assert_eq!(ty("q4_k_m", "blk.7.attn_q.bias", &[4096]), GgmlType::F32);
    }

    #[test]
    fn other_mixes_follow_their_rules() {
        let w = [4096, 4096];
        assert_eq!(
            ty("q2_k", "blk.5.attn_v.weight", &[1024, 4096]),
            GgmlType::Q4_K,
            "GQA 4"
        );
        assert_eq!(ty("q2_k", "blk.5.ffn_down.weight", &w), GgmlType::Q3_K);
        assert_eq!(ty("q2_k", "blk.5.attn_output.weight", &w), GgmlType::Q3_K);
        assert_eq!(ty("q3_k_m", "blk.1.attn_v.weight", &w), GgmlType::Q5_K);
        assert_eq!(ty("q3_k_m", "blk.2.attn_v.weight", &w), GgmlType::Q4_K);
        assert_eq!(ty("q3_k_m", "blk.1.ffn_down.weight", &w), GgmlType::Q5_K);
        assert_eq!(ty("q3_k_m", "blk.2.ffn_down.weight", &w), GgmlType::Q4_K);
        assert_eq!(ty("q3_k_s", "blk.2.ffn_down.weight", &w), GgmlType::Q3_K);
        assert_eq!(ty("q3_k_l", "blk.9.attn_output.weight", &w), GgmlType::Q5_K);
        assert_eq!(ty("q4_k_s", "blk.3.attn_v.weight", &w), GgmlType::Q5_K);
        assert_eq!(ty("q4_k_s", "blk.4.attn_v.weight", &w), GgmlType::Q4_K);
        assert_eq!(ty("q5_k_s", "blk.0.attn_v.weight", &w), GgmlType::Q5_K);
        assert_eq!(ty("q6_k", "output.weight", &w), GgmlType::Q6_K);
        assert_eq!(
            ty("q4_0", "output.weight", &w),
            GgmlType::Q6_K,
            "llama.cpp lifts output to Q6_K"
        );
        assert_eq!(ty("q8_0", "output.weight", &w), GgmlType::Q8_0);
        assert_eq!(ty("bf16", "blk.0.attn_q.weight", &w), GgmlType::BF16);
        assert_eq!(ty("f16", "blk.0.attn_norm.weight", &[4096]), GgmlType::F32);
    }

    #[test]
    fn rows_that_do_not_fit_fall_back() {
        // Tiny models: rows of 64 cannot hold 256-value super-blocks.
        assert_eq!(
            ty("q4_k_m", "blk.0.attn_q.weight", &[64, 64]),
            GgmlType::Q5_0
        );
        assert_eq!(
            ty("q4_k_m", "blk.0.attn_v.weight", &[32, 64]),
            GgmlType::Q8_0,
            "Q6_K → Q8_0"
        );
        assert_eq!(
            ty("q5_k_m", "blk.9.attn_q.weight", &[64, 64]),
            GgmlType::Q5_1
        );
        assert_eq!(
            ty("q3_k_m", "blk.9.attn_q.weight", &[64, 64]),
            GgmlType::Q4_0
        );
        assert_eq!(ty("q4_k_m", "output.weight", &[96, 64]), GgmlType::Q8_0);
        assert_eq!(ty("q8_0", "blk.0.attn_q.weight", &[64, 48]), GgmlType::F16);
        assert_eq!(ty("q4_0", "blk.0.attn_q.weight", &[64, 48]), GgmlType::F16);
    }

    #[test]
    fn seventy_b_lifts_attn_v() {
        let m = ModelShape {
            n_layer: 80,
            n_head: 64,
            n_head_kv: 8,
            tied_embeddings: false,
            is_70b: true,
        };
        let t = |p: &str, name: &str| {
            tensor_type(
                Preset::parse(p).unwrap(),
                &m,
                TensorSlot {
                    name,
                    shape: &[1024, 8192],
                },
            )
        };
        assert_eq!(t("q4_k_s", "blk.40.attn_v.weight"), GgmlType::Q5_K);
        assert_eq!(t("q4_k_m", "blk.40.attn_v.weight"), GgmlType::Q5_K);
        assert_eq!(t("q4_k_m", "blk.39.attn_v.weight"), GgmlType::Q6_K);
    }
}
