//! The trainable tensors (LoRA A/B and trainable biases): values, gradient accumulators and the
//! candle views the passes read. Frozen weights live elsewhere and have no gradient storage.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

use crate::engine::{HostData, HostTensor};

/// One trainable tensor.
#[derive(Debug)]
pub struct Param {
    /// PEFT name, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    /// Master copy the optimizer updates in place.
    pub value: Vec<f32>,
    /// Accumulated `Σ loss_scale·∂loss_sum/∂θ` since the last optimizer step.
    pub grad: Vec<f32>,
    /// `value` as a tensor for the passes; rebuilt whenever `value` changes.
    pub tensor: Tensor,
}

impl Param {
    pub fn new(name: String, shape: Vec<usize>, value: Vec<f32>) -> Result<Self> {
        let tensor = Tensor::from_slice(&value, shape.as_slice(), &Device::Cpu)?;
        let grad = vec![0.0; value.len()];
        Ok(Param {
            name,
            shape,
            value,
            grad,
            tensor,
        })
    }

    /// Re-reads `value` into `tensor` after an in-place update.
    pub fn refresh(&mut self) -> Result<()> {
        self.tensor = Tensor::from_slice(&self.value, self.shape.as_slice(), &Device::Cpu)?;
        Ok(())
    }

    pub fn accumulate(&mut self, g: &Tensor) -> Result<()> {
        if g.dims() != self.shape.as_slice() {
            bail!(
                "gradient for {} has shape {:?}, expected {:?}",
                self.name,
                g.dims(),
                self.shape
            );
        }
        let g = g.flatten_all()?.to_vec1::<f32>()?;
        for (acc, v) in self.grad.iter_mut().zip(g) {
            *acc += v;
        }
        Ok(())
    }

    pub fn to_host(&self) -> HostTensor {
        HostTensor {
            shape: self.shape.clone(),
            data: HostData::F32(self.value.clone()),
        }
    }

    /// Replaces the value from a checkpoint tensor of the same name and shape.
    pub fn load(&mut self, name: &str, t: &HostTensor) -> Result<()> {
        if name != self.name {
            bail!(
                "trainable tensor order mismatch: expected {}, got {name}",
                self.name
            );
        }
        if t.shape != self.shape {
            bail!(
                "{name}: checkpoint shape {:?} does not match the model's {:?} (other --r or model?)",
                t.shape,
                self.shape
            );
        }
        let HostData::F32(data) = &t.data else {
            bail!("{name}: checkpoint tensor is not f32");
        };
        self.value.copy_from_slice(data);
        self.refresh()
    }
}
