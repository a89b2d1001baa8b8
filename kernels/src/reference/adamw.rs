//! AdamW step constants and bit-exact f32 emulations of the `adamw_fp32` / `adamw_8bit` kernels.
//!
//! The constants are computed exactly as the host's CPU optimizers compute them
//! (`host/src/optim/adamw.rs`: torch semantics; `adamw_8bit.rs`: bitsandbytes semantics), so a
//! GPU step and a CPU step from the same state give the same bits.

use crate::quant::{nearest_code, signed_map, unsigned_map, Q8_BLOCK};

/// Which update order a step follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdamMode {
    /// torch.optim.AdamW: decay first, then the bias-corrected update.
    Torch = 0,
    /// bitsandbytes: update, then decay; a non-finite gradient zeroes the moments and skips.
    Bitsandbytes = 1,
}

/// The scalars one AdamW launch takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamStep {
    pub mode: AdamMode,
    pub beta1: f32,
    pub beta2: f32,
    /// Torch: lr / (1 - b1^t). Bitsandbytes: -lr * sqrt(1 - b2^t) / (1 - b1^t).
    pub step_size: f32,
    /// Torch: sqrt(1 - b2^t). Unused (1) for bitsandbytes.
    pub bc2_sqrt: f32,
    /// Torch: eps. Bitsandbytes: eps * sqrt(1 - b2^t).
    pub eps: f32,
    /// 1 - lr * weight_decay.
    pub decay: f32,
}

impl AdamStep {
    /// torch semantics at 1-based `step` (constants in f64, as host/src/optim/adamw.rs).
    pub fn torch(step: u64, lr: f64, weight_decay: f64, betas: (f64, f64), eps: f64) -> Self {
        let (b1, b2) = betas;
        let bc1 = 1.0 - b1.powi(step as i32);
        let bc2_sqrt = (1.0 - b2.powi(step as i32)).sqrt();
        Self {
            mode: AdamMode::Torch,
            beta1: b1 as f32,
            beta2: b2 as f32,
            step_size: (lr / bc1) as f32,
            bc2_sqrt: bc2_sqrt as f32,
            eps: eps as f32,
            decay: (1.0 - lr * weight_decay) as f32,
        }
    }

    /// bitsandbytes semantics at 1-based `step` (constants in f32, as
    /// host/src/optim/adamw_8bit.rs).
    pub fn bitsandbytes(
        step: u64,
        lr: f64,
        weight_decay: f64,
        betas: (f64, f64),
        eps: f64,
    ) -> Self {
        let (b1, b2) = (betas.0 as f32, betas.1 as f32);
        let c1 = 1.0 - b1.powf(step as f32);
        let c2 = (1.0 - b2.powf(step as f32)).sqrt();
        let lr = lr as f32;
        Self {
            mode: AdamMode::Bitsandbytes,
            beta1: b1,
            beta2: b2,
            step_size: -lr * c2 / c1,
            bc2_sqrt: 1.0,
            eps: c2 * eps as f32,
            decay: 1.0 - lr * weight_decay as f32,
        }
    }
}

/// `adamw_fp32`: one step over flat fp32 arrays; gradients are multiplied by `clip` first.
pub fn adamw_fp32(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamStep, clip: f32) {
    for i in 0..p.len() {
        let gi = g[i] * clip;
        let (mut pi, mut mi, mut vi) = (p[i], m[i], v[i]);
        match s.mode {
            AdamMode::Torch => {
                pi *= s.decay;
                mi += (1.0 - s.beta1) * (gi - mi);
                vi = vi * s.beta2 + (1.0 - s.beta2) * gi * gi;
                pi -= s.step_size * (mi / (vi.sqrt() / s.bc2_sqrt + s.eps));
            }
            AdamMode::Bitsandbytes if gi.is_finite() => {
                mi = mi * s.beta1 + (1.0 - s.beta1) * gi;
                vi = vi * s.beta2 + (1.0 - s.beta2) * gi * gi;
                pi += s.step_size * (mi / (vi.sqrt() + s.eps));
                pi *= s.decay;
            }
            AdamMode::Bitsandbytes => {
                mi = 0.0;
                vi = 0.0;
            }
        }
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
    }
}

/// Blockwise 8-bit Adam states (bitsandbytes layout): one byte per value, one absmax per 256.
#[derive(Debug, Clone, PartialEq)]
pub struct Adam8bitState {
    pub m_codes: Vec<u8>,
    pub m_absmax: Vec<f32>,
    pub v_codes: Vec<u8>,
    pub v_absmax: Vec<f32>,
}

impl Adam8bitState {
    /// Fresh state for n values: codes 0 with absmax 0 decode to zero moments.
    pub fn zeros(n: usize) -> Self {
        let blocks = n.div_ceil(Q8_BLOCK);
        Self {
            m_codes: vec![0; n],
            m_absmax: vec![0.0; blocks],
            v_codes: vec![0; n],
            v_absmax: vec![0.0; blocks],
        }
    }
}

fn quantize_signed(map: &[f32; 256], x: f32, absmax: f32) -> u8 {
    if absmax == 0.0 {
        return nearest_code(map, 0.0);
    }
    let code = nearest_code(map, x / absmax);
    if map[code as usize].is_sign_negative() != x.is_sign_negative() {
        if x > 0.0 {
            code.saturating_add(1)
        } else {
            code.saturating_sub(1)
        }
    } else {
        code
    }
}

fn quantize_unsigned(map: &[f32; 256], x: f32, absmax: f32) -> u8 {
    if absmax == 0.0 {
        0
    } else {
        nearest_code(map, x / absmax)
    }
}

/// `adamw_8bit`: bitsandbytes-order step with blockwise 8-bit moments (`s.mode` must be
/// [`AdamMode::Bitsandbytes`]).
pub fn adamw_8bit(p: &mut [f32], g: &[f32], st: &mut Adam8bitState, s: &AdamStep, clip: f32) {
    let (smap, umap) = (signed_map(), unsigned_map());
    for (b, start) in (0..p.len()).step_by(Q8_BLOCK).enumerate() {
        let end = (start + Q8_BLOCK).min(p.len());
        let mut ms = [0f32; Q8_BLOCK];
        let mut vs = [0f32; Q8_BLOCK];
        let (mut m_max, mut v_max) = (0f32, 0f32);
        for i in start..end {
            let gi = g[i] * clip;
            let m = smap[st.m_codes[i] as usize] * st.m_absmax[b];
            let v = umap[st.v_codes[i] as usize] * st.v_absmax[b];
            let (m, v) = if gi.is_finite() {
                (
                    m * s.beta1 + (1.0 - s.beta1) * gi,
                    v * s.beta2 + (1.0 - s.beta2) * gi * gi,
                )
            } else {
                (0.0, 0.0)
            };
            ms[i - start] = m;
            vs[i - start] = v;
            m_max = m_max.max(m.abs());
            v_max = v_max.max(v.abs());
        }
        for i in start..end {
            let (m, v) = (ms[i - start], vs[i - start]);
            let gi = g[i] * clip;
            if gi.is_finite() {
                p[i] += s.step_size * (m / (v.sqrt() + s.eps));
                p[i] *= s.decay;
            }
            st.m_codes[i] = quantize_signed(smap, m, m_max);
            st.v_codes[i] = quantize_unsigned(umap, v, v_max);
        }
        st.m_absmax[b] = m_max;
        st.v_absmax[b] = v_max;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BETAS: (f64, f64) = (0.9, 0.999);

    #[test]
    fn torch_and_bitsandbytes_orders_agree_up_to_the_decay_placement() {
        let g = [0.5f32, -0.25, 1e-3, 2.0];
        let (mut p1, mut m1, mut v1) = ([1.0f32, -1.0, 0.5, 0.1], [0.0f32; 4], [0.0f32; 4]);
        let (mut p2, mut m2, mut v2) = (p1, [0.0f32; 4], [0.0f32; 4]);
        for t in 1..=5 {
            let a = AdamStep::torch(t, 1e-2, 0.0, BETAS, 1e-8);
            let b = AdamStep::bitsandbytes(t, 1e-2, 0.0, BETAS, 1e-8);
            adamw_fp32(&mut p1, &g, &mut m1, &mut v1, &a, 1.0);
            adamw_fp32(&mut p2, &g, &mut m2, &mut v2, &b, 1.0);
        }
        for (a, b) in p1.iter().zip(&p2) {
            assert!((a - b).abs() < 1e-5, "{a} {b}");
        }
        // First step moves each weight by lr against its gradient's sign.
        let mut p = [1.0f32];
        adamw_fp32(
            &mut p,
            &[3.0],
            &mut [0.0],
            &mut [0.0],
            &AdamStep::torch(1, 0.1, 0.0, BETAS, 1e-8),
            1.0,
        );
        assert!((p[0] - 0.9).abs() < 1e-6);
    }

    #[test]
    fn eight_bit_states_track_fp32_states() {
        let n = 600; // two full blocks and a partial one
        let g: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 70.0)
            .collect();
        let mut p8: Vec<f32> = (0..n).map(|i| (i as f32 * 0.01).sin()).collect();
        let mut p32 = p8.clone();
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        let mut st = Adam8bitState::zeros(n);
        for t in 1..=10 {
            let s = AdamStep::bitsandbytes(t, 1e-3, 0.01, BETAS, 1e-8);
            adamw_8bit(&mut p8, &g, &mut st, &s, 0.5);
            adamw_fp32(&mut p32, &g, &mut m, &mut v, &s, 0.5);
        }
        let diff = p8
            .iter()
            .zip(&p32)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // Ten steps of lr 1e-3 move a weight by up to 1e-2; 8-bit states stay within 5% of it.
        assert!(diff < 5e-4, "{diff}");
        assert_eq!(st.m_absmax.len(), 3);
        assert!(st.m_absmax.iter().all(|&a| a > 0.0));
    }

    #[test]
    fn non_finite_gradient_skips_the_weight_in_bitsandbytes_mode() {
        let mut p = [1.0f32, 1.0];
        let (mut m, mut v) = ([0.1f32, 0.1], [0.1f32, 0.1]);
        let s = AdamStep::bitsandbytes(3, 0.1, 0.0, BETAS, 1e-8);
        adamw_fp32(&mut p, &[f32::NAN, 0.5], &mut m, &mut v, &s, 1.0);
        assert_eq!((p[0], m[0], v[0]), (1.0, 0.0, 0.0));
        assert!(p[1] < 1.0);
    }
}
