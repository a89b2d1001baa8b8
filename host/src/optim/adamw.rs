//! AdamW with fp32 states and torch's update order (`torch.optim.AdamW`, single-tensor path):
//! decoupled decay first, then the bias-corrected Adam step. The arithmetic is the kernels
//! crate's reference update (`ferrotune_kernels::reference::adamw`), which the GPU kernel
//! matches bit for bit.

use anyhow::Result;
use ferrotune_kernels::reference::adamw::{adamw_fp32, AdamStep};

use super::{
    adam_scalars, check_index, check_kind, push_moments, read_moments, read_steps, Optimizer,
    ParamSpec, ADAM_BETAS, ADAM_EPSILON,
};
use crate::engine::HostTensor;

const KIND: &str = "adamw";

pub struct AdamW {
    specs: Vec<ParamSpec>,
    /// First moment per tensor.
    exp_avg: Vec<Vec<f32>>,
    /// Second moment per tensor.
    exp_avg_sq: Vec<Vec<f32>>,
    /// Steps taken per tensor (torch keeps one count per parameter).
    steps: Vec<u64>,
}

impl AdamW {
    pub fn new(specs: Vec<ParamSpec>) -> Self {
        let zeros = |s: &ParamSpec| vec![0.0f32; s.numel()];
        Self {
            exp_avg: specs.iter().map(zeros).collect(),
            exp_avg_sq: specs.iter().map(zeros).collect(),
            steps: vec![0; specs.len()],
            specs,
        }
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, index: usize, param: &mut [f32], grad: &[f32], lr: f64) -> Result<()> {
        check_index(&self.specs, index, param, grad)?;
        self.steps[index] += 1;
        // The same update (and the same step constants) as the GPU's `adamw_fp32` kernel, so
        // both engines produce the same bits from the same state.
        let constants = AdamStep::torch(
            self.steps[index],
            lr,
            self.specs[index].weight_decay,
            ADAM_BETAS,
            ADAM_EPSILON,
        );
        adamw_fp32(
            param,
            grad,
            &mut self.exp_avg[index],
            &mut self.exp_avg_sq[index],
            &constants,
            1.0,
        );
        Ok(())
    }

    fn export_state(&self) -> (Vec<(String, HostTensor)>, serde_json::Value) {
        let mut tensors = Vec::with_capacity(2 * self.specs.len());
        for (i, spec) in self.specs.iter().enumerate() {
            push_moments(&mut tensors, spec, &self.exp_avg[i], &self.exp_avg_sq[i]);
        }
        (tensors, adam_scalars(KIND, &self.specs, &self.steps))
    }

    fn import_state(
        &mut self,
        tensors: &[(String, HostTensor)],
        scalars: &serde_json::Value,
    ) -> Result<()> {
        check_kind(scalars, KIND, &self.specs)?;
        let steps = read_steps(scalars, self.specs.len())?;
        for (i, spec) in self.specs.iter().enumerate() {
            (self.exp_avg[i], self.exp_avg_sq[i]) = read_moments(tensors, spec)?;
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, n: usize, wd: f64) -> ParamSpec {
        ParamSpec {
            name: name.into(),
            shape: vec![n],
            weight_decay: wd,
        }
    }

    /// Hand-computed first step: with m=v=0, the bias-corrected update is lr·g/(|g|+ε) = ±lr.
    #[test]
    fn first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        let mut opt = AdamW::new(vec![spec("w", 3, 0.0)]);
        let mut p = vec![1.0f32, -2.0, 0.5];
        opt.step(0, &mut p, &[0.3, -4.0, 0.0], 0.1).unwrap();
        assert!((p[0] - 0.9).abs() < 1e-6, "{p:?}");
        assert!((p[1] - -1.9).abs() < 1e-6, "{p:?}");
        assert_eq!(p[2], 0.5);
    }

    /// Two steps against a float64 re-derivation of torch's formulas, with weight decay.
    #[test]
    fn matches_torch_formulas_over_several_steps() {
        let (lr, wd) = (0.01, 0.1);
        let grads = [[0.5f64, -1.0], [0.25, 2.0], [-0.75, 0.1]];
        let mut opt = AdamW::new(vec![spec("lora_A.weight", 2, wd)]);
        let mut p = vec![1.0f32, -1.0];
        let (mut rp, mut m, mut v) = ([1.0f64, -1.0], [0.0f64; 2], [0.0f64; 2]);
        for (t, g) in grads.iter().enumerate() {
            let gf: Vec<f32> = g.iter().map(|&x| x as f32).collect();
            opt.step(0, &mut p, &gf, lr).unwrap();
            let t = (t + 1) as i32;
            for j in 0..2 {
                rp[j] *= 1.0 - lr * wd;
                m[j] = 0.9 * m[j] + 0.1 * g[j];
                v[j] = 0.999 * v[j] + 0.001 * g[j] * g[j];
                let mh = m[j] / (1.0 - 0.9f64.powi(t));
                let vh = v[j] / (1.0 - 0.999f64.powi(t));
                rp[j] -= lr * mh / (vh.sqrt() + 1e-8);
            }
        }
        for j in 0..2 {
            assert!((p[j] as f64 - rp[j]).abs() < 1e-6, "{p:?} vs {rp:?}");
        }
    }

    #[test]
    fn state_round_trips_and_continues_identically() {
        let specs = vec![spec("a", 4, 0.01), spec("b.bias", 2, 0.0)];
        let mut one = AdamW::new(specs.clone());
        let mut pa = vec![0.1f32, 0.2, 0.3, 0.4];
        let mut pb = vec![1.0f32, 2.0];
        one.step(0, &mut pa, &[0.1, -0.2, 0.3, -0.4], 1e-2).unwrap();
        one.step(1, &mut pb, &[0.5, 0.5], 1e-2).unwrap();
        let (tensors, scalars) = one.export_state();
        let mut two = AdamW::new(specs);
        two.import_state(&tensors, &scalars).unwrap();
        let (mut pa2, mut pb2) = (pa.clone(), pb.clone());
        one.step(0, &mut pa, &[1.0, 1.0, 1.0, 1.0], 1e-2).unwrap();
        two.step(0, &mut pa2, &[1.0, 1.0, 1.0, 1.0], 1e-2).unwrap();
        one.step(1, &mut pb, &[0.5, -0.5], 1e-2).unwrap();
        two.step(1, &mut pb2, &[0.5, -0.5], 1e-2).unwrap();
        assert_eq!(pa, pa2);
        assert_eq!(pb, pb2);
    }

    #[test]
    fn import_rejects_state_of_other_tensors() {
        let mut one = AdamW::new(vec![spec("a", 4, 0.0)]);
        let (tensors, scalars) = one.export_state();
        let mut other = AdamW::new(vec![spec("z", 4, 0.0)]);
        let err = other.import_state(&tensors, &scalars).unwrap_err();
        assert!(err.to_string().contains("differ"), "{err}");
        let mut p = vec![0.0f32; 3];
        assert!(one.step(0, &mut p, &[0.0; 3], 0.1).is_err());
    }
}
