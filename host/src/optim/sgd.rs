//! Plain SGD (`torch.optim.SGD` as transformers builds it for `optim=sgd`: no momentum), with
//! torch's coupled weight decay (`grad + wd·param`).

use anyhow::Result;

use super::{check_index, check_kind, Optimizer, ParamSpec};
use crate::engine::HostTensor;

const KIND: &str = "sgd";

pub struct Sgd {
    specs: Vec<ParamSpec>,
}

impl Sgd {
    pub fn new(specs: Vec<ParamSpec>) -> Self {
        Self { specs }
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, index: usize, param: &mut [f32], grad: &[f32], lr: f64) -> Result<()> {
        check_index(&self.specs, index, param, grad)?;
        let wd = self.specs[index].weight_decay as f32;
        let lr = lr as f32;
        for (p, &g) in param.iter_mut().zip(grad) {
            *p -= lr * (g + wd * *p);
        }
        Ok(())
    }

    fn export_state(&self) -> (Vec<(String, HostTensor)>, serde_json::Value) {
        let scalars = serde_json::json!({
            "optimizer": KIND,
            "params": self.specs.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
        });
        (Vec::new(), scalars)
    }

    fn import_state(
        &mut self,
        _tensors: &[(String, HostTensor)],
        scalars: &serde_json::Value,
    ) -> Result<()> {
        // Stateless: only check that the checkpoint was made by the same optimizer and tensors.
        check_kind(scalars, KIND, &self.specs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_against_the_gradient_with_coupled_decay() {
        let specs = vec![ParamSpec {
            name: "w".into(),
            shape: vec![2],
            weight_decay: 0.5,
        }];
        let mut opt = Sgd::new(specs);
        let mut p = vec![1.0f32, -1.0];
        opt.step(0, &mut p, &[2.0, 0.0], 0.1).unwrap();
        // 1 - 0.1·(2 + 0.5·1) = 0.75;  -1 - 0.1·(0 - 0.5) = -0.95
        assert!(
            (p[0] - 0.75).abs() < 1e-6 && (p[1] + 0.95).abs() < 1e-6,
            "{p:?}"
        );
    }
}
