//! ggml's k-quant super-block formats (256 values): q2_K, q3_K, q4_K, q5_K, q6_K.
//!
//! The quantizers mirror ggml's `quantize_row_q*_K_ref` (what `llama-quantize` runs without an
//! importance matrix) step for step, including the cases where a zero sub-scale leaves the
//! search's levels in place. Block layouts (little endian, from `ggml-common.h`):
//! - q2_K (84 B):  scales[16] (4-bit scale | 4-bit min << 4), qs[64], f16 d, f16 dmin
//! - q3_K (110 B): hmask[32], qs[64], scales[12] (16 × 6-bit, packed), f16 d
//! - q4_K (144 B): f16 d, f16 dmin, scales[12] (8 × 6-bit scale + 8 × 6-bit min), qs[128]
//! - q5_K (176 B): f16 d, f16 dmin, scales[12], qh[32], qs[128]
//! - q6_K (210 B): ql[128], qh[64], scales[16] (i8), f16 d

use super::float::{f16_bits_to_f32, f32_to_f16_bits};
use super::ksearch::{
    make_q3_quants, make_qkx2_quants, make_qx_quants_rmse1, nearest_int, QkxSearch, GROUP_MAX_EPS,
};
use crate::gguf::types::QK_K;

#[inline]
fn f16_round_trip(v: f32) -> (u16, f32) {
    let bits = f32_to_f16_bits(v);
    (bits, f16_bits_to_f32(bits))
}

#[inline]
fn get_f16(b: &[u8], at: usize) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// Packs 4 two-bit levels per byte the way q2_K/q3_K store them: byte `l` of each 32-byte
/// chunk holds values `l`, `l+32`, `l+64`, `l+96` of the 128-value half.
fn pack_2bit(levels: &[u8], qs: &mut [u8]) {
    for (j, q) in (0..QK_K).step_by(128).zip(qs.chunks_exact_mut(32)) {
        for l in 0..32 {
            q[l] = levels[j + l]
                | (levels[j + l + 32] << 2)
                | (levels[j + l + 64] << 4)
                | (levels[j + l + 96] << 6);
        }
    }
}

/// 6-bit scale and min `j` of the 12-byte q4_K/q5_K scale array (ggml's `get_scale_min_k4`).
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

pub fn quantize_q2_k(x: &[f32], out: &mut [u8]) {
    const Q4SCALE: f32 = 15.0;
    let search = QkxSearch {
        nmax: 3,
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
        use_mad: true,
    };
    let mut levels = [0u8; QK_K];
    let mut aux = [0u8; 16];
    let mut weights = [0f32; 16];
    for (xb, y) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(84)) {
        let (mut scales, mut mins) = ([0f32; 16], [0f32; 16]);
        let (mut max_scale, mut max_min) = (0f32, 0f32);
        for j in 0..16 {
            let xs = &xb[16 * j..16 * j + 16];
            for l in 0..16 {
                weights[l] = xs[l].abs();
            }
            let (s, m) = make_qkx2_quants(
                &search,
                xs,
                &weights,
                &mut levels[16 * j..16 * j + 16],
                &mut aux,
            );
            scales[j] = s;
            mins[j] = m;
            if s > max_scale {
                max_scale = s;
            }
            if m > max_min {
                max_min = m;
            }
        }
        let (sc, rest) = y.split_at_mut(16);
        let (qs, dd) = rest.split_at_mut(64);
        let d_bits = if max_scale > 0.0 {
            let iscale = Q4SCALE / max_scale;
            for j in 0..16 {
                sc[j] = nearest_int(iscale * scales[j]) as u8;
            }
            f32_to_f16_bits(max_scale / Q4SCALE)
        } else {
            sc.fill(0);
            f32_to_f16_bits(0.0)
        };
        let dmin_bits = if max_min > 0.0 {
            let iscale = Q4SCALE / max_min;
            for j in 0..16 {
                sc[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
            }
            f32_to_f16_bits(max_min / Q4SCALE)
        } else {
            f32_to_f16_bits(0.0)
        };
        let (d_all, dmin_all) = (f16_bits_to_f32(d_bits), f16_bits_to_f32(dmin_bits));
        for j in 0..16 {
            let d = d_all * (sc[j] & 0x0f) as f32;
            if d == 0.0 {
                continue;
            }
            let dm = dmin_all * (sc[j] >> 4) as f32;
            for ii in 0..16 {
                let l = nearest_int((xb[16 * j + ii] + dm) / d);
                levels[16 * j + ii] = l.clamp(0, 3) as u8;
            }
        }
        pack_2bit(&levels, qs);
        dd[0..2].copy_from_slice(&d_bits.to_le_bytes());
        dd[2..4].copy_from_slice(&dmin_bits.to_le_bytes());
    }
}

pub fn quantize_q3_k(x: &[f32], out: &mut [u8]) {
    let mut levels = [0i8; QK_K];
    for (xb, y) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(110)) {
        let mut scales = [0f32; 16];
        let (mut max_scale, mut amax) = (0f32, 0f32);
        for j in 0..16 {
            scales[j] = make_q3_quants(
                4,
                &xb[16 * j..16 * j + 16],
                &mut levels[16 * j..16 * j + 16],
            );
            let s = scales[j].abs();
            if s > amax {
                amax = s;
                max_scale = scales[j];
            }
        }
        let (hmask, rest) = y.split_at_mut(32);
        let (qs, rest) = rest.split_at_mut(64);
        let (sc, dd) = rest.split_at_mut(12);
        sc.fill(0);
        let d_bits;
        if max_scale != 0.0 {
            let iscale = -32.0 / max_scale;
            for j in 0..16 {
                // C: int8_t l = nearest_int(...); l = MAX(-32, MIN(31, l)) + 32;
                let l = ((nearest_int(iscale * scales[j]) as i8).clamp(-32, 31) + 32) as u8;
                if j < 8 {
                    sc[j] = l & 0x0f;
                } else {
                    sc[j - 8] |= (l & 0x0f) << 4;
                }
                sc[j % 4 + 8] |= (l >> 4) << (2 * (j / 4));
            }
            d_bits = f32_to_f16_bits(1.0 / iscale);
        } else {
            d_bits = f32_to_f16_bits(0.0);
        }
        let d_all = f16_bits_to_f32(d_bits);
        for j in 0..16 {
            let low = if j < 8 { sc[j] & 0x0f } else { sc[j - 8] >> 4 };
            let s = (low | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i32 - 32;
            let d = d_all * s as f32;
            if d == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let l = nearest_int(xb[16 * j + ii] / d).clamp(-4, 3);
                levels[16 * j + ii] = (l + 4) as i8;
            }
        }
        // High bit of each 3-bit level: bit (j / 32) of hmask[j % 32].
        hmask.fill(0);
        let mut low = [0u8; QK_K];
        for j in 0..QK_K {
            let mut l = levels[j] as u8;
            if l > 3 {
                hmask[j % 32] |= 1 << (j / 32);
                l -= 4;
            }
            low[j] = l;
        }
        pack_2bit(&low, qs);
        dd.copy_from_slice(&d_bits.to_le_bytes());
    }
}

/// Scale search + 6-bit scale packing shared by q4_K (`nmax` 15) and q5_K (`nmax` 31).
/// Returns the final levels; writes d, dmin and the 12 scale bytes into `head` (16 bytes).
fn quantize_k4_like(xb: &[f32], search: &QkxSearch, head: &mut [u8], levels: &mut [u8; QK_K]) {
    let mut aux = [0u8; 32];
    let mut weights = [0f32; 32];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &xb[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for l in 0..32 {
            weights[l] = av_x + xs[l].abs();
        }
        let (s, m) = make_qkx2_quants(
            search,
            xs,
            &weights,
            &mut levels[32 * j..32 * j + 32],
            &mut aux,
        );
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let sc = &mut head[4..16];
    for j in 0..8 {
        // C: uint8_t ls = nearest_int(...); ls = MIN(63, ls);
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    let (d_bits, d_all) = f16_round_trip(max_scale / 63.0);
    let (dmin_bits, dmin_all) = f16_round_trip(max_min / 63.0);
    head[0..2].copy_from_slice(&d_bits.to_le_bytes());
    head[2..4].copy_from_slice(&dmin_bits.to_le_bytes());
    let nmax = search.nmax;
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, &head[4..16]);
        let d = d_all * s as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * m as f32;
        for ii in 0..32 {
            let l = nearest_int((xb[32 * j + ii] + dm) / d);
            levels[32 * j + ii] = l.clamp(0, nmax) as u8;
        }
    }
}

pub fn quantize_q4_k(x: &[f32], out: &mut [u8]) {
    let search = QkxSearch {
        nmax: 15,
        rmin: -1.0,
        rdelta: 0.1,
        nstep: 20,
        use_mad: false,
    };
    let mut levels = [0u8; QK_K];
    for (xb, y) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(144)) {
        let (head, qs) = y.split_at_mut(16);
        quantize_k4_like(xb, &search, head, &mut levels);
        for (j, q) in (0..QK_K).step_by(64).zip(qs.chunks_exact_mut(32)) {
            for l in 0..32 {
                q[l] = levels[j + l] | (levels[j + l + 32] << 4);
            }
        }
    }
}

pub fn quantize_q5_k(x: &[f32], out: &mut [u8]) {
    let search = QkxSearch {
        nmax: 31,
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
        use_mad: false,
    };
    let mut levels = [0u8; QK_K];
    for (xb, y) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(176)) {
        let (head, rest) = y.split_at_mut(16);
        let (qh, ql) = rest.split_at_mut(32);
        quantize_k4_like(xb, &search, head, &mut levels);
        qh.fill(0);
        let (mut m1, mut m2) = (1u8, 2u8);
        for (n, q) in (0..QK_K).step_by(64).zip(ql.chunks_exact_mut(32)) {
            for j in 0..32 {
                let mut l1 = levels[n + j];
                if l1 > 15 {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                let mut l2 = levels[n + j + 32];
                if l2 > 15 {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                q[j] = l1 | (l2 << 4);
            }
            m1 <<= 2;
            m2 <<= 2;
        }
    }
}

pub fn quantize_q6_k(x: &[f32], out: &mut [u8]) {
    let mut levels = [0i8; QK_K];
    for (xb, y) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(210)) {
        let mut scales = [0f32; 16];
        let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
        for ib in 0..16 {
            let s = make_qx_quants_rmse1(
                32,
                &xb[16 * ib..16 * ib + 16],
                &mut levels[16 * ib..16 * ib + 16],
            );
            scales[ib] = s;
            if s.abs() > max_abs_scale {
                max_abs_scale = s.abs();
                max_scale = s;
            }
        }
        if max_abs_scale < GROUP_MAX_EPS {
            y.fill(0);
            continue;
        }
        let (ql, rest) = y.split_at_mut(128);
        let (qh, rest) = rest.split_at_mut(64);
        let (sc, dd) = rest.split_at_mut(16);
        let iscale = -128.0 / max_scale;
        let (d_bits, d_all) = f16_round_trip(1.0 / iscale);
        dd.copy_from_slice(&d_bits.to_le_bytes());
        for ib in 0..16 {
            sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
        }
        for j in 0..16 {
            let d = d_all * (sc[j] as i8) as f32;
            if d == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let l = nearest_int(xb[16 * j + ii] / d).clamp(-32, 31);
                levels[16 * j + ii] = (l + 32) as i8;
            }
        }
        let lv = |i: usize| levels[i] as u8;
        for (half, (ql, qh)) in ql
            .chunks_exact_mut(64)
            .zip(qh.chunks_exact_mut(32))
            .enumerate()
        {
            let j = half * 128;
            for l in 0..32 {
                let (a, b, c, e) = (lv(j + l), lv(j + l + 32), lv(j + l + 64), lv(j + l + 96));
                ql[l] = (a & 0x0f) | ((c & 0x0f) << 4);
                ql[l + 32] = (b & 0x0f) | ((e & 0x0f) << 4);
                qh[l] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6);
            }
        }
    }
}

pub fn dequantize_q2_k(b: &[u8], out: &mut [f32]) {
    for (y, o) in b.chunks_exact(84).zip(out.chunks_exact_mut(QK_K)) {
        let (sc, qs) = (&y[0..16], &y[16..80]);
        let (d, min) = (get_f16(y, 80), get_f16(y, 82));
        let mut k = 0;
        let mut is = 0;
        for q in qs.chunks_exact(32) {
            for shift in [0, 2, 4, 6] {
                for half in 0..2 {
                    let s = sc[is];
                    is += 1;
                    let (dl, ml) = (d * (s & 0x0f) as f32, min * (s >> 4) as f32);
                    for l in 0..16 {
                        o[k] = dl * ((q[l + 16 * half] >> shift) & 3) as f32 - ml;
                        k += 1;
                    }
                }
            }
        }
    }
}

pub fn dequantize_q3_k(b: &[u8], out: &mut [f32]) {
    for (y, o) in b.chunks_exact(110).zip(out.chunks_exact_mut(QK_K)) {
        let (hm, qs, sc) = (&y[0..32], &y[32..96], &y[96..108]);
        let d_all = get_f16(y, 108);
        let scale = |j: usize| -> i32 {
            let low = if j < 8 { sc[j] & 0x0f } else { sc[j - 8] >> 4 };
            (low | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i32 - 32
        };
        let mut k = 0;
        let mut is = 0;
        let mut m = 1u8;
        for q in qs.chunks_exact(32) {
            for shift in [0, 2, 4, 6] {
                for half in 0..2 {
                    let dl = d_all * scale(is) as f32;
                    is += 1;
                    for l in 0..16 {
                        let i = l + 16 * half;
                        let low = ((q[i] >> shift) & 3) as i32;
                        let high = if hm[i] & m != 0 { 0 } else { 4 };
                        o[k] = dl * (low - high) as f32;
                        k += 1;
                    }
                }
                m <<= 1;
            }
        }
    }
}

pub fn dequantize_q4_k(b: &[u8], out: &mut [f32]) {
    for (y, o) in b.chunks_exact(144).zip(out.chunks_exact_mut(QK_K)) {
        let (d, min) = (get_f16(y, 0), get_f16(y, 2));
        let sc = &y[4..16];
        for (c, (q, o)) in y[16..]
            .chunks_exact(32)
            .zip(o.chunks_exact_mut(64))
            .enumerate()
        {
            let (s1, m1) = scale_min_k4(2 * c, sc);
            let (s2, m2) = scale_min_k4(2 * c + 1, sc);
            let (d1, m1) = (d * s1 as f32, min * m1 as f32);
            let (d2, m2) = (d * s2 as f32, min * m2 as f32);
            for l in 0..32 {
                o[l] = d1 * (q[l] & 0x0f) as f32 - m1;
                o[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
            }
        }
    }
}

pub fn dequantize_q5_k(b: &[u8], out: &mut [f32]) {
    for (y, o) in b.chunks_exact(176).zip(out.chunks_exact_mut(QK_K)) {
        let (d, min) = (get_f16(y, 0), get_f16(y, 2));
        let (sc, qh) = (&y[4..16], &y[16..48]);
        let (mut u1, mut u2) = (1u8, 2u8);
        for (c, (ql, o)) in y[48..]
            .chunks_exact(32)
            .zip(o.chunks_exact_mut(64))
            .enumerate()
        {
            let (s1, m1) = scale_min_k4(2 * c, sc);
            let (s2, m2) = scale_min_k4(2 * c + 1, sc);
            let (d1, m1) = (d * s1 as f32, min * m1 as f32);
            let (d2, m2) = (d * s2 as f32, min * m2 as f32);
            for l in 0..32 {
                let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                o[l] = d1 * ((ql[l] & 0x0f) + h1) as f32 - m1;
                o[l + 32] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
            }
            u1 <<= 2;
            u2 <<= 2;
        }
    }
}

pub fn dequantize_q6_k(b: &[u8], out: &mut [f32]) {
    for (y, o) in b.chunks_exact(210).zip(out.chunks_exact_mut(QK_K)) {
        let d = get_f16(y, 208);
        let (ql, qh, sc) = (&y[0..128], &y[128..192], &y[192..208]);
        for half in 0..2 {
            let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
            let sc = &sc[8 * half..];
            let o = &mut o[128 * half..];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                o[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                o[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                o[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                o[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
            }
        }
    }
}
