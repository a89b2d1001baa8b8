//! AdamW with bitsandbytes' blockwise 8-bit states (`bnb.optim.AdamW8bit`,
//! `kOptimizerStatic8bit2StateBlockwise`).
//!
//! Each tensor's moments are cut into blocks of 256 values; a block stores one fp32 absmax and
//! 256 one-byte codes into a dynamic map (signed for m, unsigned for v). A step dequantises a
//! block, runs the Adam update in fp32, takes the new absmax and re-quantises. Tensors with fewer
//! than 4096 values keep fp32 states, as bitsandbytes' `min_8bit_size`. bitsandbytes applies
//! the decoupled decay after the Adam step (torch applies it before); we keep its order.

use anyhow::Result;

use super::quant_map::{self, nearest};
use super::{
    check_index, check_kind, f32_tensor, find_f32, find_u8, read_steps, Optimizer, ParamSpec,
    ADAM_BETAS, ADAM_EPSILON,
};
use crate::engine::{HostData, HostTensor};

const KIND: &str = "adamw_8bit";
/// Values per quantisation block.
pub const BLOCK: usize = 256;
/// Tensors smaller than this keep fp32 states (bitsandbytes' `min_8bit_size`).
pub const MIN_8BIT_SIZE: usize = 4096;

enum State {
    Fp32 {
        m: Vec<f32>,
        v: Vec<f32>,
    },
    Blockwise {
        m_codes: Vec<u8>,
        m_absmax: Vec<f32>,
        v_codes: Vec<u8>,
        v_absmax: Vec<f32>,
    },
}

pub struct AdamW8bit {
    specs: Vec<ParamSpec>,
    states: Vec<State>,
    steps: Vec<u64>,
}

impl AdamW8bit {
    pub fn new(specs: Vec<ParamSpec>) -> Self {
        let states = specs
            .iter()
            .map(|s| {
                let n = s.numel();
                if n < MIN_8BIT_SIZE {
                    State::Fp32 {
                        m: vec![0.0; n],
                        v: vec![0.0; n],
                    }
                } else {
                    // Codes 0 with absmax 0 decode to 0, as bitsandbytes' zero-initialised state.
                    let blocks = n.div_ceil(BLOCK);
                    State::Blockwise {
                        m_codes: vec![0; n],
                        m_absmax: vec![0.0; blocks],
                        v_codes: vec![0; n],
                        v_absmax: vec![0.0; blocks],
                    }
                }
            })
            .collect();
        Self {
            steps: vec![0; specs.len()],
            specs,
            states,
        }
    }

    /// Whether tensor `index` keeps 8-bit states.
    pub fn is_blockwise(&self, index: usize) -> bool {
        matches!(self.states[index], State::Blockwise { .. })
    }
}

/// Step constants of bitsandbytes' Adam kernels for 1-based `step`.
struct Coefficients {
    beta1: f32,
    beta2: f32,
    /// −lr·√(1−β₂ᵗ)/(1−β₁ᵗ)
    step_size: f32,
    /// ε·√(1−β₂ᵗ): ε moved inside the un-corrected denominator.
    eps_scaled: f32,
    decay: f32,
    decays: bool,
}

impl Coefficients {
    fn new(step: u64, lr: f64, weight_decay: f64) -> Self {
        let (beta1, beta2) = (ADAM_BETAS.0 as f32, ADAM_BETAS.1 as f32);
        let correction1 = 1.0 - beta1.powf(step as f32);
        let correction2 = (1.0 - beta2.powf(step as f32)).sqrt();
        let lr32 = lr as f32;
        Self {
            beta1,
            beta2,
            step_size: -lr32 * correction2 / correction1,
            eps_scaled: correction2 * ADAM_EPSILON as f32,
            decay: 1.0 - lr32 * weight_decay as f32,
            decays: weight_decay > 0.0,
        }
    }

    /// New moments for one element; a non-finite gradient zeroes them (and skips the update).
    #[inline]
    fn moments(&self, g: f32, m: f32, v: f32) -> (f32, f32) {
        if g.is_finite() {
            (
                m * self.beta1 + (1.0 - self.beta1) * g,
                v * self.beta2 + (1.0 - self.beta2) * g * g,
            )
        } else {
            (0.0, 0.0)
        }
    }

    #[inline]
    fn apply(&self, p: &mut f32, g: f32, m: f32, v: f32) {
        if g.is_finite() {
            *p += self.step_size * (m / (v.sqrt() + self.eps_scaled));
            if self.decays {
                *p *= self.decay;
            }
        }
    }
}

impl Optimizer for AdamW8bit {
    fn step(&mut self, index: usize, param: &mut [f32], grad: &[f32], lr: f64) -> Result<()> {
        check_index(&self.specs, index, param, grad)?;
        self.steps[index] += 1;
        let c = Coefficients::new(self.steps[index], lr, self.specs[index].weight_decay);
        match &mut self.states[index] {
            State::Fp32 { m, v } => {
                for (((p, &g), m), v) in param.iter_mut().zip(grad).zip(m).zip(v) {
                    (*m, *v) = c.moments(g, *m, *v);
                    c.apply(p, g, *m, *v);
                }
            }
            State::Blockwise {
                m_codes,
                m_absmax,
                v_codes,
                v_absmax,
            } => {
                let (smap, umap) = (quant_map::signed(), quant_map::unsigned());
                let mut m_block = [0f32; BLOCK];
                let mut v_block = [0f32; BLOCK];
                for (b, start) in (0..param.len()).step_by(BLOCK).enumerate() {
                    let end = (start + BLOCK).min(param.len());
                    let len = end - start;
                    // Dequantise, update the moments in fp32 and find the new block maxima.
                    let (mut m_max, mut v_max) = (0f32, 0f32);
                    for j in 0..len {
                        let i = start + j;
                        let m = smap[m_codes[i] as usize] * m_absmax[b];
                        let v = umap[v_codes[i] as usize] * v_absmax[b];
                        let (m, v) = c.moments(grad[i], m, v);
                        m_block[j] = m;
                        v_block[j] = v;
                        m_max = m_max.max(m.abs());
                        v_max = v_max.max(v.abs());
                    }
                    // The parameter update uses the fresh fp32 moments; only storage is 8-bit.
                    for j in 0..len {
                        let i = start + j;
                        c.apply(&mut param[i], grad[i], m_block[j], v_block[j]);
                        m_codes[i] = quantize_signed(smap, m_block[j], m_max);
                        v_codes[i] = quantize_unsigned(umap, v_block[j], v_max);
                    }
                    m_absmax[b] = m_max;
                    v_absmax[b] = v_max;
                }
            }
        }
        Ok(())
    }

    fn export_state(&self) -> (Vec<(String, HostTensor)>, serde_json::Value) {
        let mut tensors = Vec::new();
        for (spec, state) in self.specs.iter().zip(&self.states) {
            let name = &spec.name;
            match state {
                State::Fp32 { m, v } => {
                    tensors.push((
                        format!("{name}.exp_avg"),
                        f32_tensor(&spec.shape, m.clone()),
                    ));
                    tensors.push((
                        format!("{name}.exp_avg_sq"),
                        f32_tensor(&spec.shape, v.clone()),
                    ));
                }
                State::Blockwise {
                    m_codes,
                    m_absmax,
                    v_codes,
                    v_absmax,
                } => {
                    let codes = |c: &Vec<u8>| HostTensor {
                        shape: vec![c.len()],
                        data: HostData::U8(c.clone()),
                    };
                    tensors.push((format!("{name}.state1"), codes(m_codes)));
                    tensors.push((
                        format!("{name}.absmax1"),
                        f32_tensor(&[m_absmax.len()], m_absmax.clone()),
                    ));
                    tensors.push((format!("{name}.state2"), codes(v_codes)));
                    tensors.push((
                        format!("{name}.absmax2"),
                        f32_tensor(&[v_absmax.len()], v_absmax.clone()),
                    ));
                }
            }
        }
        let scalars = serde_json::json!({
            "optimizer": KIND,
            "betas": [ADAM_BETAS.0, ADAM_BETAS.1],
            "eps": ADAM_EPSILON,
            "block_size": BLOCK,
            "min_8bit_size": MIN_8BIT_SIZE,
            "params": self.specs.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
            "weight_decay": self.specs.iter().map(|s| s.weight_decay).collect::<Vec<_>>(),
            "steps": self.steps,
        });
        (tensors, scalars)
    }

    fn import_state(
        &mut self,
        tensors: &[(String, HostTensor)],
        scalars: &serde_json::Value,
    ) -> Result<()> {
        check_kind(scalars, KIND, &self.specs)?;
        let steps = read_steps(scalars, self.specs.len())?;
        for (spec, state) in self.specs.iter().zip(self.states.iter_mut()) {
            let name = &spec.name;
            let n = spec.numel();
            match state {
                State::Fp32 { m, v } => {
                    *m = find_f32(tensors, &format!("{name}.exp_avg"), n)?.to_vec();
                    *v = find_f32(tensors, &format!("{name}.exp_avg_sq"), n)?.to_vec();
                }
                State::Blockwise {
                    m_codes,
                    m_absmax,
                    v_codes,
                    v_absmax,
                } => {
                    let blocks = n.div_ceil(BLOCK);
                    *m_codes = find_u8(tensors, &format!("{name}.state1"), n)?.to_vec();
                    *m_absmax = find_f32(tensors, &format!("{name}.absmax1"), blocks)?.to_vec();
                    *v_codes = find_u8(tensors, &format!("{name}.state2"), n)?.to_vec();
                    *v_absmax = find_f32(tensors, &format!("{name}.absmax2"), blocks)?.to_vec();
                }
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// Nearest signed code of `x / absmax`, nudged one code toward `x`'s sign when rounding crossed
/// zero (bitsandbytes keeps the first moment's sign through quantisation).
fn quantize_signed(map: &[f32; 256], x: f32, absmax: f32) -> u8 {
    if absmax == 0.0 {
        return nearest(map, 0.0);
    }
    let code = nearest(map, x / absmax);
    let q = map[code as usize];
    if q.is_sign_negative() != x.is_sign_negative() {
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
        return 0;
    }
    nearest(map, x / absmax)
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::super::AdamW;
    use super::*;

    fn spec(name: &str, n: usize, wd: f64) -> ParamSpec {
        ParamSpec {
            name: name.into(),
            shape: vec![n],
            weight_decay: wd,
        }
    }

    /// Minimises ½‖p − target‖² with noisy gradients; returns the final parameters.
    fn descend(opt: &mut dyn Optimizer, n: usize, steps: usize) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let target: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut p = vec![0.0f32; n];
        for _ in 0..steps {
            let g: Vec<f32> = p
                .iter()
                .zip(&target)
                .map(|(p, t)| (p - t) + 0.05 * rng.random_range(-1.0f32..1.0))
                .collect();
            opt.step(0, &mut p, &g, 1e-2).unwrap();
        }
        p
    }

    #[test]
    fn eight_bit_tracks_fp32_adamw_closely() {
        let n = 8192;
        let specs = vec![spec("lora_B.weight", n, 0.01)];
        let mut q = AdamW8bit::new(specs.clone());
        assert!(q.is_blockwise(0));
        let mut f = AdamW::new(specs);
        let pq = descend(&mut q, n, 200);
        let pf = descend(&mut f, n, 200);
        let diff: f32 = pq
            .iter()
            .zip(&pf)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f32>()
            .sqrt();
        let norm: f32 = pf.iter().map(|a| a * a).sum::<f32>().sqrt();
        assert!(diff / norm < 0.02, "relative distance {}", diff / norm);
        // And both actually moved toward the target.
        assert!(norm > 10.0, "{norm}");
    }

    #[test]
    fn small_tensors_keep_fp32_states_equal_to_bitsandbytes_formula() {
        let mut q = AdamW8bit::new(vec![spec("b", 3, 0.1)]);
        assert!(!q.is_blockwise(0));
        let mut p = vec![1.0f32, -1.0, 0.5];
        q.step(0, &mut p, &[0.5, -0.5, 0.0], 0.1).unwrap();
        // First step: update = -lr·sign(g), then decay by (1 − lr·wd) = 0.99.
        assert!((p[0] - 0.9 * 0.99).abs() < 1e-6, "{p:?}");
        assert!((p[1] - -0.9 * 0.99).abs() < 1e-6, "{p:?}");
        assert!((p[2] - 0.5 * 0.99).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn non_finite_gradients_leave_the_weight_alone() {
        let n = MIN_8BIT_SIZE;
        let mut q = AdamW8bit::new(vec![spec("w", n, 0.0)]);
        let mut p = vec![1.0f32; n];
        let mut g = vec![0.1f32; n];
        g[3] = f32::NAN;
        q.step(0, &mut p, &g, 0.1).unwrap();
        assert_eq!(p[3], 1.0);
        assert!((p[4] - 0.9).abs() < 1e-5, "{}", p[4]);
    }

    #[test]
    fn quantised_first_moment_keeps_its_sign() {
        let map = quant_map::signed();
        let tiny = -1e-9f32;
        let code = quantize_signed(map, tiny, 1.0);
        assert!(map[code as usize] < 0.0);
    }

    #[test]
    fn state_round_trips_bitwise() {
        let n = 5000; // two full blocks short of 20 and a partial last block
        let specs = vec![spec("w", n, 0.01), spec("s.bias", 10, 0.0)];
        let mut one = AdamW8bit::new(specs.clone());
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut p: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut s = vec![0.5f32; 10];
        let g: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        one.step(0, &mut p, &g, 1e-3).unwrap();
        one.step(1, &mut s, &[0.1; 10], 1e-3).unwrap();
        let (tensors, scalars) = one.export_state();
        let mut two = AdamW8bit::new(specs);
        two.import_state(&tensors, &scalars).unwrap();
        let mut p2 = p.clone();
        one.step(0, &mut p, &g, 1e-3).unwrap();
        two.step(0, &mut p2, &g, 1e-3).unwrap();
        assert_eq!(p, p2);
        // fp32 state of another optimizer is refused.
        let (t, sc) = AdamW::new(vec![spec("w", n, 0.0), spec("s.bias", 10, 0.0)]).export_state();
        assert!(two.import_state(&t, &sc).is_err());
    }
}
