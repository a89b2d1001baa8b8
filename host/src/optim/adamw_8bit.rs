//! AdamW with bitsandbytes' blockwise 8-bit states (`bnb.optim.AdamW8bit`,
//! `kOptimizerStatic8bit2StateBlockwise`).
//!
//! Each tensor's moments are cut into blocks of 256 values; a block stores one fp32 absmax and
//! 256 one-byte codes into a dynamic map (signed for m, unsigned for v). A step dequantises a
//! block, runs the Adam update in fp32, takes the new absmax and re-quantises. Tensors with fewer
//! than 4096 values keep fp32 states, as bitsandbytes' `min_8bit_size`. bitsandbytes applies
//! the decoupled decay after the Adam step (torch applies it before); we keep its order.
//!
//! The update and the dynamic maps are the kernels crate's (`ferrotune_kernels::reference::adamw`,
//! `ferrotune_kernels::quant`): one definition for this optimizer and the GPU kernel it mirrors.

use anyhow::Result;
use ferrotune_kernels::quant::Q8_BLOCK;
use ferrotune_kernels::reference::adamw::{adamw_8bit, adamw_fp32, Adam8bitState, AdamStep};

use super::{
    adam_scalars, check_index, check_kind, f32_tensor, find_f32, find_u8, push_moments,
    read_moments, read_steps, Optimizer, ParamSpec, ADAM_BETAS, ADAM_EPSILON,
};
use crate::engine::{HostData, HostTensor};

const KIND: &str = "adamw_8bit";
/// Values per quantisation block.
pub const BLOCK: usize = Q8_BLOCK;
/// Tensors smaller than this keep fp32 states (bitsandbytes' `min_8bit_size`).
pub const MIN_8BIT_SIZE: usize = 4096;

enum State {
    Fp32 { m: Vec<f32>, v: Vec<f32> },
    Blockwise(Adam8bitState),
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
                    State::Blockwise(Adam8bitState::zeros(n))
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
        matches!(self.states[index], State::Blockwise(_))
    }
}

impl Optimizer for AdamW8bit {
    fn step(&mut self, index: usize, param: &mut [f32], grad: &[f32], lr: f64) -> Result<()> {
        check_index(&self.specs, index, param, grad)?;
        self.steps[index] += 1;
        // bitsandbytes' step constants and update order, shared with the GPU's `adamw_8bit`
        // kernel (whose reference this is), so both engines produce the same bits.
        let constants = AdamStep::bitsandbytes(
            self.steps[index],
            lr,
            self.specs[index].weight_decay,
            ADAM_BETAS,
            ADAM_EPSILON,
        );
        match &mut self.states[index] {
            State::Fp32 { m, v } => adamw_fp32(param, grad, m, v, &constants, 1.0),
            State::Blockwise(state) => adamw_8bit(param, grad, state, &constants, 1.0),
        }
        Ok(())
    }

    fn export_state(&self) -> (Vec<(String, HostTensor)>, serde_json::Value) {
        let mut tensors = Vec::new();
        for (spec, state) in self.specs.iter().zip(&self.states) {
            let name = &spec.name;
            match state {
                State::Fp32 { m, v } => push_moments(&mut tensors, spec, m, v),
                State::Blockwise(s) => {
                    let codes = |c: &Vec<u8>| HostTensor {
                        shape: vec![c.len()],
                        data: HostData::U8(c.clone()),
                    };
                    let absmax = |a: &Vec<f32>| f32_tensor(&[a.len()], a.clone());
                    tensors.push((format!("{name}.state1"), codes(&s.m_codes)));
                    tensors.push((format!("{name}.absmax1"), absmax(&s.m_absmax)));
                    tensors.push((format!("{name}.state2"), codes(&s.v_codes)));
                    tensors.push((format!("{name}.absmax2"), absmax(&s.v_absmax)));
                }
            }
        }
        let mut scalars = adam_scalars(KIND, &self.specs, &self.steps);
        scalars["block_size"] = BLOCK.into();
        scalars["min_8bit_size"] = MIN_8BIT_SIZE.into();
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
                State::Fp32 { m, v } => (*m, *v) = read_moments(tensors, spec)?,
                State::Blockwise(s) => {
                    let blocks = n.div_ceil(BLOCK);
                    s.m_codes = find_u8(tensors, &format!("{name}.state1"), n)?.to_vec();
                    s.m_absmax = find_f32(tensors, &format!("{name}.absmax1"), blocks)?.to_vec();
                    s.v_codes = find_u8(tensors, &format!("{name}.state2"), n)?.to_vec();
                    s.v_absmax = find_f32(tensors, &format!("{name}.absmax2"), blocks)?.to_vec();
                }
            }
        }
        self.steps = steps;
        Ok(())
    }
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
        // One large gradient sets the block's absmax; a tiny negative one would round to the
        // map's zero, and bitsandbytes nudges it one code to keep its sign.
        let n = MIN_8BIT_SIZE;
        let mut q = AdamW8bit::new(vec![spec("w", n, 0.0)]);
        let mut g = vec![0.0f32; n];
        g[0] = 1.0;
        g[1] = -1e-9;
        q.step(0, &mut vec![0.0; n], &g, 1e-3).unwrap();
        let (tensors, _) = q.export_state();
        let code = find_u8(&tensors, "w.state1", n).unwrap()[1];
        assert!(ferrotune_kernels::quant::signed_map()[code as usize] < 0.0);
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
