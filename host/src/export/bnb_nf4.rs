//! One linear weight in bitsandbytes' serialised NF4 layout, the `merged_4bit` save.
//!
//! What `bnb.nn.Linear4bit` writes into a state dict (`QuantState.as_dict(packed=True)`) for
//! NF4 with double quantisation, and what `Params4bit.from_prequantized` reads back:
//! - `weight`: u8 `[n/2, 1]`, two 4-bit codes per byte, value 2j in the high nibble of byte j,
//!   blocks of 64 consecutive values of the row-major weight;
//! - `weight.absmax`: u8 `[n/64]`, each block's absmax minus `nested_offset`, 8-bit blockwise
//!   quantised (blocks of 256) with the signed dynamic map;
//! - `weight.nested_absmax`: f32, one absmax per 256 block absmaxes;
//! - `weight.nested_quant_map`: f32 `[256]`, the signed dynamic map;
//! - `weight.quant_map`: f32 `[16]`, the NF4 levels;
//! - `weight.quant_state.bitsandbytes__nf4`: u8, the UTF-8 bytes of `json.dumps` of the
//!   non-tensor fields (quant type, blocksize, dtype, shape, nested blocksize/dtype/offset).
//!
//! The codes and the double quantisation are `ferrotune_kernels::reference::nf4`, the same
//! reference the QLoRA kernels are checked against (bitsandbytes' algorithm).

use anyhow::{ensure, Result};
use rayon::prelude::*;

use ferrotune_kernels::quant::{signed_map, NF4_BLOCK, NF4_LEVELS, Q8_BLOCK};
use ferrotune_kernels::reference::nf4::{
    dequantize_absmax, nf4_dequantize, nf4_quantize, quantize_blockwise_8bit,
};

use super::safetensors_dir::StoreDtype;

/// The key bitsandbytes files the packed quant state under (`quant_state.bitsandbytes__<type>`).
pub const QUANT_STATE_KEY: &str = "quant_state.bitsandbytes__nf4";

/// Whether bitsandbytes quantises this tensor when transformers loads the model in 4 bit: the
/// weight of every `nn.Linear` in the decoder layers. Embeddings, norms (1-D) and `lm_head`
/// (transformers' default `llm_int8_skip_modules`) stay in 16 bit.
pub fn is_decoder_linear(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && name.starts_with("model.layers.") && name.ends_with(".weight")
}

/// torch's name of a storage dtype (`str(torch.bfloat16).strip("torch.")`).
pub fn torch_dtype_name(dtype: StoreDtype) -> &'static str {
    match dtype {
        StoreDtype::F32 => "float32",
        StoreDtype::F16 => "float16",
        StoreDtype::BF16 => "bfloat16",
    }
}

/// One weight quantised to NF4 with double-quantised absmax.
#[derive(Debug, Clone)]
pub struct Nf4Weight {
    pub shape: Vec<usize>,
    /// The weight's dtype before quantisation (the `dtype` of the quant state).
    pub dtype: StoreDtype,
    pub packed: Vec<u8>,
    /// 8-bit codes of `absmax - offset`, one per block of 64.
    pub absmax_codes: Vec<u8>,
    /// One f32 per 256 block absmaxes.
    pub nested_absmax: Vec<f32>,
    /// Mean of the block absmaxes (`nested_offset`).
    pub offset: f32,
}

/// A tensor to store: safetensors dtype name, shape, little-endian bytes.
#[derive(Debug, Clone)]
pub struct StoredTensor {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Values per parallel work item: a whole number of NF4 blocks.
const CHUNK: usize = NF4_BLOCK * 1024;

impl Nf4Weight {
    /// Quantises `values` (already rounded to `dtype`, row-major `shape`). A last block shorter
    /// than 64 values is quantised over its own values, as bitsandbytes does.
    pub fn quantize(values: &[f32], shape: &[usize], dtype: StoreDtype) -> Result<Self> {
        let n = values.len();
        ensure!(
            n == shape.iter().product::<usize>() && n > 0 && n.is_multiple_of(2),
            "NF4 needs a non-empty weight with an even number of values (shape {shape:?})"
        );
        let parts: Vec<(Vec<u8>, Vec<f32>)> = values
            .par_chunks(CHUNK)
            .map(|chunk| {
                if chunk.len().is_multiple_of(NF4_BLOCK) {
                    nf4_quantize(chunk)
                } else {
                    // Zero padding changes no block's absmax; its codes are cut off below.
                    let mut padded = chunk.to_vec();
                    padded.resize(chunk.len().next_multiple_of(NF4_BLOCK), 0.0);
                    let (mut packed, absmax) = nf4_quantize(&padded);
                    packed.truncate(chunk.len() / 2);
                    (packed, absmax)
                }
            })
            .collect();
        let mut packed = Vec::with_capacity(n / 2);
        let mut absmax = Vec::with_capacity(n.div_ceil(NF4_BLOCK));
        for (p, a) in parts {
            packed.extend(p);
            absmax.extend(a);
        }
        // bitsandbytes: offset = absmax.mean(); quantize_blockwise(absmax - offset, blocksize=256).
        let offset = (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32;
        let (absmax_codes, nested_absmax) = quantize_blockwise_8bit(&absmax, offset, signed_map());
        Ok(Nf4Weight {
            shape: shape.to_vec(),
            dtype,
            packed,
            absmax_codes,
            nested_absmax,
            offset,
        })
    }

    /// The block absmaxes a loader reconstructs from the double quantisation.
    pub fn absmax(&self) -> Vec<f32> {
        dequantize_absmax(
            &self.absmax_codes,
            &self.nested_absmax,
            signed_map(),
            self.offset,
        )
    }

    /// The weight a loader sees (`bnb.functional.dequantize_4bit`), in f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let n = self.packed.len() * 2;
        let absmax = self.absmax();
        let mut packed = self.packed.clone();
        packed.resize(n.next_multiple_of(NF4_BLOCK) / 2, 0x77);
        let mut out = nf4_dequantize(&packed, &absmax);
        out.truncate(n);
        out
    }

    /// `json.dumps` of the non-tensor quant state, byte for byte as bitsandbytes writes it.
    pub fn quant_state_json(&self) -> String {
        let shape: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        format!(
            "{{\"quant_type\": \"nf4\", \"blocksize\": {NF4_BLOCK}, \"dtype\": \"{}\", \"shape\": [{}], \
             \"nested_blocksize\": {Q8_BLOCK}, \"nested_dtype\": \"float32\", \"nested_offset\": {}}}",
            torch_dtype_name(self.dtype),
            shape.join(", "),
            python_float_repr(self.offset as f64)
        )
    }

    /// The six state-dict entries of `Linear4bit` for the weight called `name`
    /// (`model.layers.0.self_attn.q_proj.weight`), in the order bitsandbytes emits them.
    pub fn tensors(&self, name: &str) -> Vec<StoredTensor> {
        let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let entry = |suffix: &str, dtype, shape: Vec<usize>, bytes| StoredTensor {
            name: if suffix.is_empty() {
                name.to_string()
            } else {
                format!("{name}.{suffix}")
            },
            dtype,
            shape,
            bytes,
        };
        let state = self.quant_state_json().into_bytes();
        vec![
            entry("", "U8", vec![self.packed.len(), 1], self.packed.clone()),
            entry(
                "absmax",
                "U8",
                vec![self.absmax_codes.len()],
                self.absmax_codes.clone(),
            ),
            entry("quant_map", "F32", vec![16], f32_bytes(&NF4_LEVELS)),
            entry(
                "nested_absmax",
                "F32",
                vec![self.nested_absmax.len()],
                f32_bytes(&self.nested_absmax),
            ),
            entry(
                "nested_quant_map",
                "F32",
                vec![256],
                f32_bytes(signed_map()),
            ),
            entry(QUANT_STATE_KEY, "U8", vec![state.len()], state),
        ]
    }
}

/// transformers' `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
/// bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=…).to_dict()`, as `quantization_config`
/// in config.json. `llm_int8_skip_modules: null` lets transformers skip its default modules
/// (`lm_head`), matching what is stored in 16 bit.
pub fn quantization_config(compute_dtype: &str) -> serde_json::Value {
    serde_json::json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": true,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes",
    })
}

/// Python's `repr(float)`: the shortest digits that round-trip, in fixed notation for
/// 1e-4 <= |x| < 1e16 (with ".0" for integral values) and as `d.ddde-05` otherwise.
pub fn python_float_repr(x: f64) -> String {
    if !x.is_finite() {
        return if x.is_nan() {
            "NaN".into()
        } else if x > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    if (-4..16).contains(&exp) {
        let fixed = format!("{x}");
        if fixed.contains('.') {
            fixed
        } else {
            format!("{fixed}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_like_python_repr() {
        for (x, want) in [
            (0.0125, "0.0125"),
            (0.1f32 as f64, "0.10000000149011612"),
            (1.0, "1.0"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (123.0, "123.0"),
            (-2.5e-10, "-2.5e-10"),
        ] {
            assert_eq!(python_float_repr(x), want, "{x}");
        }
    }

    /// `offset.item()` of a float32 tensor is the f32 widened to a double, which Python prints
    /// with all the digits that double needs.
    #[test]
    fn quant_state_is_json_dumps_of_the_non_tensor_fields() {
        let w = Nf4Weight {
            shape: vec![512, 256],
            dtype: StoreDtype::BF16,
            packed: vec![],
            absmax_codes: vec![],
            nested_absmax: vec![],
            offset: 0.0125,
        };
        assert_eq!(
            w.quant_state_json(),
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [512, 256], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.012500000186264515}"#
        );
    }

    fn weights(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * 0.7123).sin() * 0.05 * (1.0 + (i % 7) as f32))
            .collect()
    }

    #[test]
    fn entries_have_bitsandbytes_names_shapes_and_dtypes() {
        let (rows, cols) = (96, 320); // 480 blocks: two nested blocks, the last partial
        let w = weights(rows * cols);
        let q = Nf4Weight::quantize(&w, &[rows, cols], StoreDtype::BF16).unwrap();
        let t = q.tensors("model.layers.0.mlp.up_proj.weight");
        let summary: Vec<(&str, &str, Vec<usize>)> = t
            .iter()
            .map(|t| (t.name.as_str(), t.dtype, t.shape.clone()))
            .collect();
        let json_len = q.quant_state_json().len();
        assert_eq!(
            summary,
            [
                ("model.layers.0.mlp.up_proj.weight", "U8", vec![15360, 1]),
                ("model.layers.0.mlp.up_proj.weight.absmax", "U8", vec![480]),
                (
                    "model.layers.0.mlp.up_proj.weight.quant_map",
                    "F32",
                    vec![16]
                ),
                (
                    "model.layers.0.mlp.up_proj.weight.nested_absmax",
                    "F32",
                    vec![2]
                ),
                (
                    "model.layers.0.mlp.up_proj.weight.nested_quant_map",
                    "F32",
                    vec![256]
                ),
                (
                    "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4",
                    "U8",
                    vec![json_len]
                ),
            ]
        );
        for t in &t {
            let elems: usize = t.shape.iter().product();
            let size = if t.dtype == "F32" { 4 } else { 1 };
            assert_eq!(t.bytes.len(), elems * size, "{}", t.name);
        }
        let state: serde_json::Value = serde_json::from_slice(&t[5].bytes).unwrap();
        assert_eq!(state["shape"], serde_json::json!([96, 320]));
        assert_eq!(state["nested_offset"].as_f64().unwrap() as f32, q.offset);
    }

    #[test]
    fn round_trip_stays_within_nf4_error_and_matches_the_reference_blocks() {
        let w = weights(64 * 1500 + 64 * 3);
        let q = Nf4Weight::quantize(&w, &[w.len()], StoreDtype::F32).unwrap();
        // Parallel chunking gives exactly what one reference call over the whole tensor gives.
        let (packed, absmax) = nf4_quantize(&w);
        assert_eq!(q.packed, packed);
        let back = q.dequantize();
        let deq_absmax = q.absmax();
        for (i, (x, y)) in w.iter().zip(&back).enumerate() {
            let (a, a_dq) = (absmax[i / 64], deq_absmax[i / 64]);
            // Half the widest NF4 level gap, plus what double quantisation moved the absmax.
            assert!(
                (x - y).abs() <= 0.1520 * a + (a - a_dq).abs() + 1e-7,
                "{i}: {x} vs {y}"
            );
        }
        let mean = absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64;
        assert_eq!(q.offset, mean as f32);
    }

    #[test]
    fn a_partial_last_block_is_quantised_over_its_own_values() {
        let w = weights(64 * 2 + 10);
        let q = Nf4Weight::quantize(&w, &[2, 69], StoreDtype::F16).unwrap();
        assert_eq!((q.packed.len(), q.absmax_codes.len()), (69, 3));
        let last_max = w[128..].iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!((q.absmax()[2] - last_max).abs() < 0.02 * last_max + 1e-4);
        assert_eq!(q.dequantize().len(), w.len());
        assert!(Nf4Weight::quantize(&w[..137], &[137], StoreDtype::F16).is_err());
    }

    #[test]
    fn only_decoder_linears_are_quantised() {
        assert!(is_decoder_linear(
            "model.layers.3.self_attn.q_proj.weight",
            &[8, 8]
        ));
        assert!(!is_decoder_linear(
            "model.layers.3.self_attn.q_proj.bias",
            &[8]
        ));
        assert!(!is_decoder_linear(
            "model.layers.3.input_layernorm.weight",
            &[8]
        ));
        assert!(!is_decoder_linear("model.embed_tokens.weight", &[8, 8]));
        assert!(!is_decoder_linear("lm_head.weight", &[8, 8]));
    }
}
