//! NF4 quantisation in bitsandbytes' layout, bit-exact emulations of `nf4.cu`.

use crate::quant::{nearest_code, nf4_code, NF4_BLOCK, NF4_LEVELS, Q8_BLOCK};

/// Returns (packed codes [n/2], absmax [n/64]); n % 64 == 0. Value 2j goes to the high nibble
/// of byte j.
pub fn nf4_quantize(w: &[f32]) -> (Vec<u8>, Vec<f32>) {
    assert_eq!(w.len() % NF4_BLOCK, 0, "NF4 needs a multiple of 64 values");
    let mut packed = Vec::with_capacity(w.len() / 2);
    let mut absmax = Vec::with_capacity(w.len() / NF4_BLOCK);
    for block in w.chunks_exact(NF4_BLOCK) {
        let amax = block.iter().fold(0f32, |a, &b| a.max(b.abs()));
        let inv = if amax > 0.0 { 1.0 / amax } else { 0.0 };
        for pair in block.chunks_exact(2) {
            packed.push((nf4_code(pair[0] * inv) << 4) | nf4_code(pair[1] * inv));
        }
        absmax.push(amax);
    }
    (packed, absmax)
}

/// Dequantised values (f32; the kernel rounds these to bf16).
pub fn nf4_dequantize(packed: &[u8], absmax: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(packed.len() * 2);
    for (j, &byte) in packed.iter().enumerate() {
        let a = absmax[j * 2 / NF4_BLOCK];
        out.push(NF4_LEVELS[(byte >> 4) as usize] * a);
        out.push(NF4_LEVELS[(byte & 15) as usize] * a);
    }
    out
}

/// 8-bit blockwise quantisation (blocks of 256) of x - offset with `map`: (codes, absmax).
pub fn quantize_blockwise_8bit(x: &[f32], offset: f32, map: &[f32; 256]) -> (Vec<u8>, Vec<f32>) {
    let mut q = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(Q8_BLOCK));
    for block in x.chunks(Q8_BLOCK) {
        let amax = block.iter().fold(0f32, |a, &b| a.max((b - offset).abs()));
        for &v in block {
            let y = v - offset;
            q.push(if amax == 0.0 {
                map.partition_point(|&m| m < 0.0) as u8
            } else {
                nearest_code(map, y / amax)
            });
        }
        absmax.push(amax);
    }
    (q, absmax)
}

/// Absmax values of double quantisation: code2[q] * absmax2[block of 256] + offset, rounded
/// after the product and after the sum (no fused multiply-add).
pub fn dequantize_absmax(q: &[u8], absmax2: &[f32], code2: &[f32; 256], offset: f32) -> Vec<f32> {
    q.iter()
        .enumerate()
        .map(|(i, &c)| code2[c as usize] * absmax2[i / Q8_BLOCK] + offset)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::signed_map;

    #[test]
    fn round_trip_error_is_within_half_the_widest_level_gap() {
        let w: Vec<f32> = (0..256)
            .map(|i| ((i * 97 % 256) as f32 - 128.0) / 50.0)
            .collect();
        let (packed, absmax) = nf4_quantize(&w);
        assert_eq!((packed.len(), absmax.len()), (128, 4));
        let back = nf4_dequantize(&packed, &absmax);
        for (b, (x, y)) in w.iter().zip(&back).enumerate() {
            let a = absmax[b / 64];
            // Widest gap between NF4 levels is -0.6962 - (-1) = 0.304.
            assert!((x - y).abs() <= 0.1520 * a, "{x} {y}");
        }
        // The block maximum itself is exact (level ±1).
        let imax = w[..64]
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap()
            .0;
        assert_eq!(back[imax], w[imax]);
    }

    #[test]
    fn first_value_goes_to_the_high_nibble() {
        let mut w = vec![0.0f32; 64];
        w[0] = -1.0; // code 0
        w[1] = 1.0; // code 15
        let (packed, absmax) = nf4_quantize(&w);
        assert_eq!(packed[0], 0x0f);
        assert_eq!(packed[1], 0x77); // zeros are code 7
        assert_eq!(absmax[0], 1.0);
        assert!(nf4_quantize(&[0.0; 64]).1[0] == 0.0);
    }

    #[test]
    fn double_quantised_absmax_stays_close() {
        let absmax: Vec<f32> = (0..700)
            .map(|i| 0.01 + (i as f32 * 0.37).sin().abs() * 0.05)
            .collect();
        let offset = (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32;
        let (q, a2) = quantize_blockwise_8bit(&absmax, offset, signed_map());
        assert_eq!(a2.len(), 3);
        let back = dequantize_absmax(&q, &a2, signed_map(), offset);
        for (x, y) in absmax.iter().zip(&back) {
            assert!((x - y).abs() < 0.03 * 0.05, "{x} {y}");
        }
    }
}
