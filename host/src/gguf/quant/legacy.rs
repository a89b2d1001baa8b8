//! ggml's 32-value block formats: q4_0, q4_1, q5_0, q5_1 and q8_0.
//!
//! Each quantizer follows ggml's `quantize_row_*_ref` operation for operation (same f32
//! expression order, same truncating casts), so the bytes equal what `llama-quantize` writes
//! without an importance matrix. Block layouts (little endian):
//! - q4_0: f16 d, 16 bytes of nibbles (value j in the low nibble of byte j, value j+16 in the high)
//! - q4_1: f16 d, f16 m, 16 bytes of nibbles
//! - q5_0: f16 d, u32 high bits, 16 bytes of nibbles
//! - q5_1: f16 d, f16 m, u32 high bits, 16 bytes of nibbles
//! - q8_0: f16 d, 32 i8

use super::float::{f16_bits_to_f32, f32_to_f16_bits};

pub const QK: usize = 32;

#[inline]
fn put_f16(out: &mut [u8], at: usize, v: f32) {
    out[at..at + 2].copy_from_slice(&f32_to_f16_bits(v).to_le_bytes());
}

#[inline]
fn get_f16(b: &[u8], at: usize) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// The signed value of largest magnitude (the first one on ties), as ggml picks it.
#[inline]
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

#[inline]
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

#[inline]
fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

pub fn quantize_q4_0(x: &[f32], out: &mut [u8]) {
    for (xb, y) in x.chunks_exact(QK).zip(out.chunks_exact_mut(18)) {
        let d = signed_absmax(xb) / -8.0;
        let id = inverse(d);
        put_f16(y, 0, d);
        for j in 0..QK / 2 {
            // C: MIN(15, (int8_t)(x*id + 8.5f)) — a truncating cast, not a rounding one.
            let q0 = ((xb[j] * id + 8.5) as i8).min(15) as u8;
            let q1 = ((xb[j + QK / 2] * id + 8.5) as i8).min(15) as u8;
            y[2 + j] = q0 | (q1 << 4);
        }
    }
}

pub fn quantize_q4_1(x: &[f32], out: &mut [u8]) {
    for (xb, y) in x.chunks_exact(QK).zip(out.chunks_exact_mut(20)) {
        let (min, max) = min_max(xb);
        let d = (max - min) / 15.0;
        let id = inverse(d);
        put_f16(y, 0, d);
        put_f16(y, 2, min);
        for j in 0..QK / 2 {
            let q0 = (((xb[j] - min) * id + 0.5) as i8).min(15) as u8;
            let q1 = (((xb[j + QK / 2] - min) * id + 0.5) as i8).min(15) as u8;
            y[4 + j] = q0 | (q1 << 4);
        }
    }
}

pub fn quantize_q5_0(x: &[f32], out: &mut [u8]) {
    for (xb, y) in x.chunks_exact(QK).zip(out.chunks_exact_mut(22)) {
        let d = signed_absmax(xb) / -16.0;
        let id = inverse(d);
        put_f16(y, 0, d);
        let mut qh = 0u32;
        for j in 0..QK / 2 {
            let q0 = ((xb[j] * id + 16.5) as i8).min(31) as u8;
            let q1 = ((xb[j + QK / 2] * id + 16.5) as i8).min(31) as u8;
            y[6 + j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
            qh |= (((q0 & 0x10) >> 4) as u32) << j;
            qh |= (((q1 & 0x10) >> 4) as u32) << (j + QK / 2);
        }
        y[2..6].copy_from_slice(&qh.to_le_bytes());
    }
}

pub fn quantize_q5_1(x: &[f32], out: &mut [u8]) {
    for (xb, y) in x.chunks_exact(QK).zip(out.chunks_exact_mut(24)) {
        let (min, max) = min_max(xb);
        let d = (max - min) / 31.0;
        let id = inverse(d);
        put_f16(y, 0, d);
        put_f16(y, 2, min);
        let mut qh = 0u32;
        for j in 0..QK / 2 {
            // C: (uint8_t)(x + 0.5f), no clamp.
            let q0 = ((xb[j] - min) * id + 0.5) as u8;
            let q1 = ((xb[j + QK / 2] - min) * id + 0.5) as u8;
            y[8 + j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
            qh |= (((q0 & 0x10) >> 4) as u32) << j;
            qh |= (((q1 & 0x10) >> 4) as u32) << (j + QK / 2);
        }
        y[4..8].copy_from_slice(&qh.to_le_bytes());
    }
}

pub fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    for (xb, y) in x.chunks_exact(QK).zip(out.chunks_exact_mut(34)) {
        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = inverse(d);
        put_f16(y, 0, d);
        for j in 0..QK {
            // roundf: half away from zero, like f32::round.
            y[2 + j] = (xb[j] * id).round() as i8 as u8;
        }
    }
}

pub fn dequantize_q4_0(b: &[u8], out: &mut [f32]) {
    for (y, o) in b.chunks_exact(18).zip(out.chunks_exact_mut(QK)) {
        let d = get_f16(y, 0);
        for j in 0..QK / 2 {
            o[j] = ((y[2 + j] & 0x0f) as i32 - 8) as f32 * d;
            o[j + QK / 2] = ((y[2 + j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

pub fn dequantize_q4_1(b: &[u8], out: &mut [f32]) {
    for (y, o) in b.chunks_exact(20).zip(out.chunks_exact_mut(QK)) {
        let (d, m) = (get_f16(y, 0), get_f16(y, 2));
        for j in 0..QK / 2 {
            o[j] = (y[4 + j] & 0x0f) as f32 * d + m;
            o[j + QK / 2] = (y[4 + j] >> 4) as f32 * d + m;
        }
    }
}

fn high_bit(qh: u32, j: usize) -> u8 {
    (((qh >> j) & 1) << 4) as u8
}

pub fn dequantize_q5_0(b: &[u8], out: &mut [f32]) {
    for (y, o) in b.chunks_exact(22).zip(out.chunks_exact_mut(QK)) {
        let d = get_f16(y, 0);
        let qh = u32::from_le_bytes([y[2], y[3], y[4], y[5]]);
        for j in 0..QK / 2 {
            let q0 = ((y[6 + j] & 0x0f) | high_bit(qh, j)) as i32 - 16;
            let q1 = ((y[6 + j] >> 4) | high_bit(qh, j + QK / 2)) as i32 - 16;
            o[j] = q0 as f32 * d;
            o[j + QK / 2] = q1 as f32 * d;
        }
    }
}

pub fn dequantize_q5_1(b: &[u8], out: &mut [f32]) {
    for (y, o) in b.chunks_exact(24).zip(out.chunks_exact_mut(QK)) {
        let (d, m) = (get_f16(y, 0), get_f16(y, 2));
        let qh = u32::from_le_bytes([y[4], y[5], y[6], y[7]]);
        for j in 0..QK / 2 {
            let q0 = (y[8 + j] & 0x0f) | high_bit(qh, j);
            let q1 = (y[8 + j] >> 4) | high_bit(qh, j + QK / 2);
            o[j] = q0 as f32 * d + m;
            o[j + QK / 2] = q1 as f32 * d + m;
        }
    }
}

pub fn dequantize_q8_0(b: &[u8], out: &mut [f32]) {
    for (y, o) in b.chunks_exact(34).zip(out.chunks_exact_mut(QK)) {
        let d = get_f16(y, 0);
        for j in 0..QK {
            o[j] = (y[2 + j] as i8) as f32 * d;
        }
    }
}
