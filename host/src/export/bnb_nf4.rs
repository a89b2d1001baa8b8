//! One linear weight in bitsandbytes' serialised NF4 layout: what the `merged_4bit` save writes
//! and what a pre-quantised `*-bnb-4bit` base model is read from — one definition for both.
//!
//! What `bnb.nn.Linear4bit` writes into a state dict (`QuantState.as_dict(packed=True)`), and
//! what `Params4bit.from_prequantized` reads back:
//! - `weight`: u8 `[n/2, 1]`, two 4-bit codes per byte, value 2j in the high nibble of byte j,
//!   blocks of 64 consecutive values of the row-major weight;
//! - `weight.absmax`: with double quantisation (`bnb_4bit_use_double_quant`) u8 `[n/64]`, each
//!   block's absmax minus `nested_offset`, 8-bit blockwise quantised (blocks of 256) with the
//!   signed dynamic map; without it, f32 `[n/64]`, the absmax itself;
//! - `weight.nested_absmax` (double quantisation only): f32, one absmax per 256 block absmaxes;
//! - `weight.nested_quant_map` (double quantisation only): f32 `[256]`, the signed dynamic map;
//! - `weight.quant_map`: f32 `[16]`, the NF4 levels;
//! - `weight.quant_state.bitsandbytes__nf4`: u8, the UTF-8 bytes of `json.dumps` of the
//!   non-tensor fields (quant type, blocksize, dtype, shape, nested blocksize/dtype/offset).
//!
//! The codes and the double quantisation are `ferrotune_kernels::reference::nf4`, the same
//! reference the QLoRA kernels are checked against (bitsandbytes' algorithm).

use std::borrow::Cow;

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use safetensors::Dtype;
use serde::Deserialize;

use ferrotune_kernels::quant::{signed_map, NF4_BLOCK, NF4_LEVELS, Q8_BLOCK};
use ferrotune_kernels::reference::nf4::{
    dequantize_absmax, nf4_dequantize, nf4_quantize, quantize_blockwise_8bit,
};

use super::safetensors_dir::StoreDtype;

/// The key bitsandbytes files the packed quant state under (`quant_state.bitsandbytes__<type>`).
pub const QUANT_STATE_KEY: &str = "quant_state.bitsandbytes__nf4";
/// The same key for bitsandbytes' other 4-bit type, which ferrotune does not load.
pub const FP4_QUANT_STATE_KEY: &str = "quant_state.bitsandbytes__fp4";
/// Suffixes (after `<module>.weight.`) of the tensors stored beside a 4-bit weight's codes.
pub const COMPANIONS: [&str; 5] = [
    "absmax",
    "quant_map",
    "nested_absmax",
    "nested_quant_map",
    QUANT_STATE_KEY,
];

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

/// The storage dtype torch calls `name` (the quant state's `dtype`).
pub fn dtype_from_torch_name(name: &str) -> Option<StoreDtype> {
    match name {
        "float32" => Some(StoreDtype::F32),
        "float16" => Some(StoreDtype::F16),
        "bfloat16" => Some(StoreDtype::BF16),
        _ => None,
    }
}

/// One weight quantised to NF4.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Weight {
    pub shape: Vec<usize>,
    /// The weight's dtype before quantisation (the `dtype` of the quant state): dequantised
    /// values are rounded to it, as `bnb.functional.dequantize_4bit` returns that dtype.
    pub dtype: StoreDtype,
    pub packed: Vec<u8>,
    pub absmax: Nf4Absmax,
}

/// The per-block scales of an [`Nf4Weight`].
#[derive(Debug, Clone, PartialEq)]
pub enum Nf4Absmax {
    /// `bnb_4bit_use_double_quant=False`: one f32 per block of 64.
    Plain(Vec<f32>),
    /// `bnb_4bit_use_double_quant=True` (what ferrotune writes).
    Double(DoubleQuant),
}

/// Double-quantised block absmaxes: `code[codes[i]] * nested_absmax[i / 256] + offset`.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuant {
    /// 8-bit codes of `absmax - offset`, one per block of 64.
    pub codes: Vec<u8>,
    /// One f32 per 256 block absmaxes.
    pub nested_absmax: Vec<f32>,
    /// Mean of the block absmaxes (`nested_offset`).
    pub offset: f32,
    /// The codes' code book (`nested_quant_map`): bitsandbytes' signed dynamic map. A loaded
    /// weight keeps the one its file stores, since bitsandbytes dequantises with that one.
    pub code: Box<[f32; 256]>,
}

/// A tensor to store: safetensors dtype name, shape, little-endian bytes.
#[derive(Debug, Clone)]
pub struct StoredTensor {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// A stored tensor as a reader finds it (borrowed from a memory map or read into a buffer).
#[derive(Debug, Clone)]
pub struct RawTensor<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Cow<'a, [u8]>,
}

/// Values per parallel work item: a whole number of NF4 blocks.
const CHUNK: usize = NF4_BLOCK * 1024;

impl Nf4Weight {
    /// Quantises `values` (already rounded to `dtype`, row-major `shape`) with double-quantised
    /// absmax. A last block shorter than 64 values is quantised over its own values, as
    /// bitsandbytes does.
    pub fn quantize(values: &[f32], shape: &[usize], dtype: StoreDtype) -> Result<Self> {
        let (packed, absmax) = quantize_codes(values, shape)?;
        // bitsandbytes: offset = absmax.mean(); quantize_blockwise(absmax - offset, blocksize=256).
        let offset = (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32;
        let (codes, nested_absmax) = quantize_blockwise_8bit(&absmax, offset, signed_map());
        Ok(Nf4Weight {
            shape: shape.to_vec(),
            dtype,
            packed,
            absmax: Nf4Absmax::Double(DoubleQuant {
                codes,
                nested_absmax,
                offset,
                code: Box::new(*signed_map()),
            }),
        })
    }

    /// As [`Nf4Weight::quantize`] with plain f32 absmax (`bnb_4bit_use_double_quant=False`).
    pub fn quantize_plain(values: &[f32], shape: &[usize], dtype: StoreDtype) -> Result<Self> {
        let (packed, absmax) = quantize_codes(values, shape)?;
        Ok(Nf4Weight {
            shape: shape.to_vec(),
            dtype,
            packed,
            absmax: Nf4Absmax::Plain(absmax),
        })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The block absmaxes a loader reconstructs (`dequantize_blockwise(absmax, state2) +
    /// offset` under double quantisation: two roundings, no fused multiply-add).
    pub fn absmax(&self) -> Vec<f32> {
        match &self.absmax {
            Nf4Absmax::Plain(a) => a.clone(),
            Nf4Absmax::Double(d) => {
                dequantize_absmax(&d.codes, &d.nested_absmax, &d.code, d.offset)
            }
        }
    }

    /// The weight a loader sees, `bnb.functional.dequantize_4bit`: each value is the NF4 level
    /// times its block's absmax in f32, rounded to the quant state's dtype; returned widened
    /// to f32 (exact).
    pub fn dequantize(&self) -> Vec<f32> {
        let n = self.numel();
        let absmax = self.absmax();
        let mut out: Vec<f32> = self
            .packed
            .par_chunks(CHUNK / 2)
            .enumerate()
            .flat_map_iter(|(c, bytes)| {
                let blocks = c * CHUNK / NF4_BLOCK..;
                let mut bytes = bytes.to_vec();
                // A partial last block: pad to whole blocks, cut the padding off below.
                bytes.resize(bytes.len().next_multiple_of(NF4_BLOCK / 2), 0x77);
                let scales = &absmax[blocks][..bytes.len() * 2 / NF4_BLOCK];
                nf4_dequantize(&bytes, scales)
            })
            .collect();
        out.truncate(n);
        out.par_iter_mut()
            .with_min_len(CHUNK)
            .for_each(|v| *v = self.dtype.round(*v));
        out
    }

    /// `json.dumps` of the non-tensor quant state, byte for byte as bitsandbytes writes it.
    pub fn quant_state_json(&self) -> String {
        let shape: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        let nested = match &self.absmax {
            Nf4Absmax::Plain(_) => String::new(),
            Nf4Absmax::Double(d) => format!(
                ", \"nested_blocksize\": {Q8_BLOCK}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                python_float_repr(d.offset as f64)
            ),
        };
        format!(
            "{{\"quant_type\": \"nf4\", \"blocksize\": {NF4_BLOCK}, \"dtype\": \"{}\", \"shape\": [{}]{nested}}}",
            torch_dtype_name(self.dtype),
            shape.join(", "),
        )
    }

    /// The state-dict entries of `Linear4bit` for the weight called `name`
    /// (`model.layers.0.self_attn.q_proj.weight`), in the order bitsandbytes emits them: six
    /// with double quantisation, four without.
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
        let mut out = vec![entry(
            "",
            "U8",
            vec![self.packed.len(), 1],
            self.packed.clone(),
        )];
        match &self.absmax {
            Nf4Absmax::Plain(a) => {
                out.push(entry("absmax", "F32", vec![a.len()], f32_bytes(a)));
                out.push(entry("quant_map", "F32", vec![16], f32_bytes(&NF4_LEVELS)));
            }
            Nf4Absmax::Double(d) => {
                out.push(entry("absmax", "U8", vec![d.codes.len()], d.codes.clone()));
                out.push(entry("quant_map", "F32", vec![16], f32_bytes(&NF4_LEVELS)));
                out.push(entry(
                    "nested_absmax",
                    "F32",
                    vec![d.nested_absmax.len()],
                    f32_bytes(&d.nested_absmax),
                ));
                out.push(entry(
                    "nested_quant_map",
                    "F32",
                    vec![256],
                    f32_bytes(&d.code[..]),
                ));
            }
        }
        out.push(entry(QUANT_STATE_KEY, "U8", vec![state.len()], state));
        out
    }

    /// Reads the 4-bit weight `name` (`model.layers.0.mlp.up_proj.weight`) from its stored
    /// entries, as `Params4bit.from_prequantized` does, checking every entry against the quant
    /// state: NF4, blocks of 64, shapes and dtypes consistent. `get` finds an entry by its full
    /// name (`None`: absent). Errors are one line naming the entry and what is wrong.
    pub fn read<'a>(
        name: &str,
        get: impl Fn(&str) -> Result<Option<RawTensor<'a>>>,
    ) -> Result<Self> {
        let entry = |suffix: &str| -> Result<RawTensor<'a>> {
            let full = format!("{name}.{suffix}");
            get(&full)?.with_context(|| {
                format!("{full} is missing: a bitsandbytes 4-bit weight stores it beside {name}")
            })
        };
        let state = QuantState::parse(name, &entry(QUANT_STATE_KEY)?.bytes)?;
        let state_err = |what: String| anyhow::anyhow!("{name}.{QUANT_STATE_KEY}: {what}");
        let n: usize = state.shape.iter().product();
        let blocks = n.div_ceil(NF4_BLOCK);
        let packed = check_entry(name, "", &get(name)?, Dtype::U8, n / 2)?;
        check_quant_map(name, &entry("quant_map")?)?;
        let absmax_t = entry("absmax")?;
        let absmax = match (state.json.nested_offset, state.json.nested_blocksize) {
            (None, None) => {
                let a = check_entry(name, ".absmax", &Some(absmax_t), Dtype::F32, blocks)?;
                Nf4Absmax::Plain(f32s(&a))
            }
            (Some(offset), Some(nested_blocksize)) => {
                if nested_blocksize != Q8_BLOCK {
                    return Err(state_err(format!(
                        "nested_blocksize {nested_blocksize}; bitsandbytes double-quantises in blocks of {Q8_BLOCK}"
                    )));
                }
                if let Some(d) = state.json.nested_dtype.as_deref().filter(|d| *d != "float32") {
                    return Err(state_err(format!("nested_dtype {d:?}; expected float32")));
                }
                let codes = check_entry(name, ".absmax", &Some(absmax_t), Dtype::U8, blocks)?;
                let nested = entry("nested_absmax")?;
                let nested = check_entry(
                    name,
                    ".nested_absmax",
                    &Some(nested),
                    Dtype::F32,
                    blocks.div_ceil(Q8_BLOCK),
                )?;
                let map = entry("nested_quant_map")?;
                let map = f32s(&check_entry(
                    name,
                    ".nested_quant_map",
                    &Some(map),
                    Dtype::F32,
                    256,
                )?);
                Nf4Absmax::Double(DoubleQuant {
                    codes: codes.into_owned(),
                    nested_absmax: f32s(&nested),
                    offset: offset as f32,
                    code: Box::new(map.try_into().expect("checked: 256 values")),
                })
            }
            _ => {
                return Err(state_err(
                    "has only one of nested_offset and nested_blocksize (double quantisation needs both)"
                        .into(),
                ))
            }
        };
        Ok(Nf4Weight {
            shape: state.shape,
            dtype: state.dtype,
            packed: packed.into_owned(),
            absmax,
        })
    }
}

/// The packed quant state of a 4-bit weight, checked to be one ferrotune loads: NF4, blocks
/// of 64, a 16/32-bit float dtype, a non-empty even number of values.
pub struct QuantState {
    pub shape: Vec<usize>,
    /// The weight's dtype before quantisation.
    pub dtype: StoreDtype,
    json: QuantStateJson,
}

impl QuantState {
    /// Parses the bytes of `<name>.quant_state.bitsandbytes__nf4`.
    pub fn parse(name: &str, bytes: &[u8]) -> Result<Self> {
        let json: QuantStateJson = serde_json::from_slice(bytes).with_context(|| {
            format!("{name}.{QUANT_STATE_KEY} is not bitsandbytes' quant state JSON")
        })?;
        let state_err = |what: String| anyhow::anyhow!("{name}.{QUANT_STATE_KEY}: {what}");
        if json.quant_type != "nf4" {
            return Err(state_err(format!(
                "quant_type {:?}; ferrotune loads NF4 4-bit weights only",
                json.quant_type
            )));
        }
        if json.blocksize != NF4_BLOCK {
            return Err(state_err(format!(
                "blocksize {}; ferrotune loads NF4 with blocks of {NF4_BLOCK} (bitsandbytes' QLoRA default)",
                json.blocksize
            )));
        }
        let dtype = dtype_from_torch_name(&json.dtype).ok_or_else(|| {
            state_err(format!(
                "dtype {:?}; expected bfloat16, float16 or float32",
                json.dtype
            ))
        })?;
        let n: usize = json.shape.iter().product();
        if n == 0 || !n.is_multiple_of(2) {
            return Err(state_err(format!(
                "shape {:?}: NF4 weights here have a non-zero, even number of values",
                json.shape
            )));
        }
        Ok(QuantState {
            shape: json.shape.clone(),
            dtype,
            json,
        })
    }
}

/// The non-tensor fields of a packed quant state (other keys are ignored).
#[derive(Deserialize)]
struct QuantStateJson {
    quant_type: String,
    blocksize: usize,
    dtype: String,
    shape: Vec<usize>,
    nested_blocksize: Option<usize>,
    nested_dtype: Option<String>,
    nested_offset: Option<f64>,
}

/// NF4 codes and f32 absmax of `values` (parallel over whole blocks).
fn quantize_codes(values: &[f32], shape: &[usize]) -> Result<(Vec<u8>, Vec<f32>)> {
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
    Ok((packed, absmax))
}

/// The bytes of entry `name{suffix}`, checked to be `dtype` with `numel` values. The packed
/// codes are `[n/2, 1]` as bitsandbytes stores them (`[n/2]` is accepted too).
fn check_entry<'a>(
    name: &str,
    suffix: &str,
    t: &Option<RawTensor<'a>>,
    dtype: Dtype,
    numel: usize,
) -> Result<Cow<'a, [u8]>> {
    let full = format!("{name}{suffix}");
    let Some(t) = t else {
        bail!("{full} is missing: a bitsandbytes 4-bit weight stores it beside {name}");
    };
    if t.dtype != dtype {
        bail!(
            "{full} is {:?}, expected {dtype:?} (bitsandbytes 4-bit layout with uint8 quant storage)",
            t.dtype
        );
    }
    let ok_shape = if suffix.is_empty() {
        t.shape == [numel, 1] || t.shape == [numel]
    } else {
        t.shape == [numel]
    };
    if !ok_shape {
        let want = if suffix.is_empty() {
            format!("[{numel}, 1]")
        } else {
            format!("[{numel}]")
        };
        bail!(
            "{full} has shape {:?}, but its quant state implies {want}",
            t.shape
        );
    }
    let size = if dtype == Dtype::F32 { 4 } else { 1 };
    ensure!(
        t.bytes.len() == numel * size,
        "{full}: {} bytes for {numel} values of {dtype:?}",
        t.bytes.len()
    );
    Ok(t.bytes.clone())
}

/// `quant_map` must be the NF4 table: bitsandbytes' NF4 kernels use their built-in levels and
/// never read it, so a different table means the file is not what its quant state says.
fn check_quant_map(name: &str, t: &RawTensor) -> Result<()> {
    let map = f32s(&check_entry(
        name,
        ".quant_map",
        &Some(t.clone()),
        Dtype::F32,
        16,
    )?);
    let off = map
        .iter()
        .zip(NF4_LEVELS)
        .position(|(a, b)| (a - b).abs() > 1e-6);
    if let Some(i) = off {
        bail!(
            "{name}.quant_map[{i}] is {}, not NF4's level {}: not an NF4 weight",
            map[i],
            NF4_LEVELS[i]
        );
    }
    Ok(())
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
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
            absmax: Nf4Absmax::Double(DoubleQuant {
                codes: vec![],
                nested_absmax: vec![],
                offset: 0.0125,
                code: Box::new(*signed_map()),
            }),
        };
        assert_eq!(
            w.quant_state_json(),
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [512, 256], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.012500000186264515}"#
        );
    }

    fn offset(q: &Nf4Weight) -> f32 {
        match &q.absmax {
            Nf4Absmax::Double(d) => d.offset,
            Nf4Absmax::Plain(_) => panic!("double-quantised"),
        }
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
        assert_eq!(state["nested_offset"].as_f64().unwrap() as f32, offset(&q));
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
        assert_eq!(offset(&q), mean as f32);
    }

    #[test]
    fn a_partial_last_block_is_quantised_over_its_own_values() {
        let w = weights(64 * 2 + 10);
        let q = Nf4Weight::quantize(&w, &[2, 69], StoreDtype::F16).unwrap();
        assert_eq!((q.packed.len(), q.absmax().len()), (69, 3));
        let last_max = w[128..].iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!((q.absmax()[2] - last_max).abs() < 0.02 * last_max + 1e-4);
        assert_eq!(q.dequantize().len(), w.len());
        assert!(Nf4Weight::quantize(&w[..137], &[137], StoreDtype::F16).is_err());
    }

    /// The entries as a reader finds them in a file.
    fn as_file(entries: &[StoredTensor]) -> std::collections::HashMap<String, RawTensor<'static>> {
        entries
            .iter()
            .map(|t| {
                let dtype = match t.dtype {
                    "U8" => Dtype::U8,
                    "F32" => Dtype::F32,
                    other => panic!("{other}"),
                };
                let raw = RawTensor {
                    dtype,
                    shape: t.shape.clone(),
                    bytes: Cow::Owned(t.bytes.clone()),
                };
                (t.name.clone(), raw)
            })
            .collect()
    }

    fn read_back(
        name: &str,
        file: &std::collections::HashMap<String, RawTensor<'static>>,
    ) -> Result<Nf4Weight> {
        Nf4Weight::read(name, |n| Ok(file.get(n).cloned()))
    }

    #[test]
    fn what_is_written_reads_back_identically_with_and_without_double_quantisation() {
        let name = "model.layers.1.mlp.down_proj.weight";
        // 433 blocks, the last one partial: two nested blocks.
        let w: Vec<f32> = weights(96 * 289)
            .iter()
            .map(|&x| StoreDtype::BF16.round(x))
            .collect();
        for q in [
            Nf4Weight::quantize(&w, &[96, 289], StoreDtype::BF16).unwrap(),
            Nf4Weight::quantize_plain(&w, &[96, 289], StoreDtype::BF16).unwrap(),
        ] {
            let entries = q.tensors(name);
            let plain = matches!(q.absmax, Nf4Absmax::Plain(_));
            assert_eq!(entries.len(), if plain { 4 } else { 6 });
            let back = read_back(name, &as_file(&entries)).unwrap();
            assert_eq!(back, q);
            // bitsandbytes' dequantize_4bit: level × block absmax in f32, rounded to bfloat16.
            let absmax = q.absmax();
            let want: Vec<f32> = (0..w.len())
                .map(|i| {
                    let byte = q.packed[i / 2];
                    let code = if i % 2 == 0 { byte >> 4 } else { byte & 15 };
                    let v = NF4_LEVELS[code as usize] * absmax[i / 64];
                    half::bf16::from_f32(v).to_f32()
                })
                .collect();
            assert_eq!(back.dequantize(), want);
        }
    }

    #[test]
    fn malformed_entries_are_one_line_errors_naming_the_entry() {
        let name = "model.layers.0.self_attn.q_proj.weight";
        let q = Nf4Weight::quantize(&weights(64 * 8), &[16, 32], StoreDtype::BF16).unwrap();
        let good = as_file(&q.tensors(name));
        let state_key = format!("{name}.{QUANT_STATE_KEY}");
        let with_state = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut file = good.clone();
            let mut state: serde_json::Value =
                serde_json::from_slice(&file[&state_key].bytes).unwrap();
            edit(&mut state);
            file.get_mut(&state_key).unwrap().bytes = Cow::Owned(state.to_string().into_bytes());
            read_back(name, &file).unwrap_err().to_string()
        };
        let cases: Vec<(String, &str)> = vec![
            (
                with_state(&|s| s["quant_type"] = "fp4".into()),
                "quant_type \"fp4\"",
            ),
            (
                with_state(&|s| s["blocksize"] = 128.into()),
                "blocksize 128",
            ),
            (
                with_state(&|s| s["shape"] = serde_json::json!([32, 32])),
                "implies [512, 1]",
            ),
            (
                with_state(&|s| {
                    s.as_object_mut().unwrap().remove("nested_offset");
                }),
                "only one of nested_offset",
            ),
            (
                {
                    let mut file = good.clone();
                    file.remove(&format!("{name}.nested_absmax"));
                    read_back(name, &file).unwrap_err().to_string()
                },
                "nested_absmax is missing",
            ),
            (
                {
                    let mut file = good.clone();
                    file.remove(&state_key);
                    read_back(name, &file).unwrap_err().to_string()
                },
                "quant_state.bitsandbytes__nf4 is missing",
            ),
            (
                {
                    let mut file = good.clone();
                    let map = file.get_mut(&format!("{name}.quant_map")).unwrap();
                    map.bytes = Cow::Owned(vec![0; 64]);
                    read_back(name, &file).unwrap_err().to_string()
                },
                "quant_map[0] is 0",
            ),
            (
                {
                    let mut file = good.clone();
                    file.get_mut(name).unwrap().dtype = Dtype::BF16;
                    read_back(name, &file).unwrap_err().to_string()
                },
                "is BF16, expected U8",
            ),
        ];
        for (err, want) in cases {
            assert!(err.contains(want), "{err:?} lacks {want:?}");
            assert!(err.contains(name) && !err.contains('\n'), "{err:?}");
        }
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
