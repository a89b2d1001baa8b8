//! Row quantization and dequantization for every [`GgmlType`], bit-exact with ggml's reference
//! quantizers, plus a parallel driver for whole tensors.
//!
//! Exactness is checked two ways: `tests` below compare SHA-256 digests of our output with
//! digests produced by ggml's own C code (`ggml-quants.c`, compiled with `-ffp-contract=off`,
//! see `docs/export.md`), and the CI test `tests/export.rs` has the `gguf` Python package
//! quantize the same rows (for the types it implements) and dequantize all of them.

mod float;
mod kquants;
mod ksearch;
mod legacy;

use anyhow::{ensure, Result};
use rayon::prelude::*;

pub use float::{bf16_bits_to_f32, f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits};

use super::types::GgmlType;

/// Encodes one or more whole rows (`x.len()` a multiple of the block size) into `out`, which
/// must be exactly `ty.row_bytes(x.len())` long.
pub fn quantize_into(ty: GgmlType, x: &[f32], out: &mut [u8]) -> Result<()> {
    ensure!(
        out.len() == ty.row_bytes(x.len())?,
        "{ty}: output buffer of {} bytes for {} values",
        out.len(),
        x.len()
    );
    match ty {
        GgmlType::F32 => float::encode_f32(x, out),
        GgmlType::F16 => float::encode_f16(x, out),
        GgmlType::BF16 => float::encode_bf16(x, out),
        GgmlType::Q4_0 => legacy::quantize_q4_0(x, out),
        GgmlType::Q4_1 => legacy::quantize_q4_1(x, out),
        GgmlType::Q5_0 => legacy::quantize_q5_0(x, out),
        GgmlType::Q5_1 => legacy::quantize_q5_1(x, out),
        GgmlType::Q8_0 => legacy::quantize_q8_0(x, out),
        GgmlType::Q2_K => kquants::quantize_q2_k(x, out),
        GgmlType::Q3_K => kquants::quantize_q3_k(x, out),
        GgmlType::Q4_K => kquants::quantize_q4_k(x, out),
        GgmlType::Q5_K => kquants::quantize_q5_k(x, out),
        GgmlType::Q6_K => kquants::quantize_q6_k(x, out),
    }
    Ok(())
}

/// Decodes `bytes` (whole blocks of `ty`) into `out.len()` values.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    ensure!(
        bytes.len() == ty.row_bytes(out.len())?,
        "{ty}: {} bytes do not hold {} values",
        bytes.len(),
        out.len()
    );
    match ty {
        GgmlType::F32 => float::decode_f32(bytes, out),
        GgmlType::F16 => float::decode_f16(bytes, out),
        GgmlType::BF16 => float::decode_bf16(bytes, out),
        GgmlType::Q4_0 => legacy::dequantize_q4_0(bytes, out),
        GgmlType::Q4_1 => legacy::dequantize_q4_1(bytes, out),
        GgmlType::Q5_0 => legacy::dequantize_q5_0(bytes, out),
        GgmlType::Q5_1 => legacy::dequantize_q5_1(bytes, out),
        GgmlType::Q8_0 => legacy::dequantize_q8_0(bytes, out),
        GgmlType::Q2_K => kquants::dequantize_q2_k(bytes, out),
        GgmlType::Q3_K => kquants::dequantize_q3_k(bytes, out),
        GgmlType::Q4_K => kquants::dequantize_q4_k(bytes, out),
        GgmlType::Q5_K => kquants::dequantize_q5_k(bytes, out),
        GgmlType::Q6_K => kquants::dequantize_q6_k(bytes, out),
    }
    Ok(())
}

/// Quantizes a row-major matrix of rows of `row_len` values, rows spread over all cores.
/// Blocks never span rows, so the result equals quantizing the rows one by one.
pub fn quantize_rows(ty: GgmlType, x: &[f32], row_len: usize) -> Result<Vec<u8>> {
    ensure!(
        row_len > 0 && x.len().is_multiple_of(row_len),
        "{} values are not whole rows of {row_len}",
        x.len()
    );
    let row_bytes = ty.row_bytes(row_len)?;
    let mut out = vec![0u8; x.len() / row_len * row_bytes];
    // Enough rows per task to amortise scheduling, few enough to balance 2..128 cores.
    let rows_per_task = (1 << 16) / row_len + 1;
    out.par_chunks_mut(row_bytes * rows_per_task)
        .zip(x.par_chunks(row_len * rows_per_task))
        .try_for_each(|(o, xs)| quantize_into(ty, xs, o))?;
    Ok(out)
}

/// Dequantizes a whole tensor of `n` values.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let mut out = vec![0f32; n];
    dequantize_into(ty, bytes, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests;
