//! Optimizers and learning-rate schedules. A backend owns its parameters and gradients and calls an
//! [`Optimizer`] once per trainable tensor per optimizer step; the schedule gives the step's lr.
//!
//! Optimizer names follow transformers' `optim`: `adamw_torch`, `adamw_torch_fused` and `adamw`
//! are fp32 AdamW with torch semantics; `adamw_8bit` and `paged_adamw_8bit` keep bitsandbytes'
//! blockwise 8-bit states (paging is a GPU memory concern, so on the host both are the same
//! update); `sgd` is plain SGD.

mod adamw;
mod adamw_8bit;
pub mod schedule;
mod sgd;

use anyhow::Result;

use crate::cli::choices::Optim;
use crate::engine::HostTensor;
use crate::job::JobConfig;

pub use adamw::AdamW;
pub use adamw_8bit::AdamW8bit;
pub use sgd::Sgd;

/// One optimizer over a fixed, ordered list of trainable tensors.
pub trait Optimizer: Send {
    /// One update of `param` (flat f32) with gradient `grad`; `index` identifies the tensor (stable order).
    ///
    /// `grad` is the final gradient for this step: the backend has already applied gradient
    /// clipping (`grad_scale`). Each tensor is stepped exactly once per optimizer step.
    fn step(&mut self, index: usize, param: &mut [f32], grad: &[f32], lr: f64) -> Result<()>;
    /// State as named tensors plus a JSON blob of scalars (step counts, hyper-parameters).
    fn export_state(&self) -> (Vec<(String, HostTensor)>, serde_json::Value);
    /// Restores what `export_state` produced; a mismatch (other optimizer, other tensors) is an error.
    fn import_state(
        &mut self,
        tensors: &[(String, HostTensor)],
        scalars: &serde_json::Value,
    ) -> Result<()>;
}

/// Adam's β₁, β₂ and ε: transformers' `TrainingArguments` defaults.
pub const ADAM_BETAS: (f64, f64) = (0.9, 0.999);
pub const ADAM_EPSILON: f64 = 1e-8;

/// One trainable tensor as the optimizer sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    /// Decoupled weight decay for this tensor (0 for biases and norm weights).
    pub weight_decay: f64,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// transformers' Trainer decays every parameter except biases and normalisation weights
/// (`get_decay_parameter_names`); LoRA A/B matrices decay, trainable biases do not.
pub fn decays(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !(lower.contains("bias") || lower.contains("norm"))
}

/// The parameter list with each tensor's weight decay, in the backend's order.
pub fn param_specs(shapes: &[(String, Vec<usize>)], weight_decay: f64) -> Vec<ParamSpec> {
    shapes
        .iter()
        .map(|(name, shape)| ParamSpec {
            name: name.clone(),
            shape: shape.clone(),
            weight_decay: if decays(name) { weight_decay } else { 0.0 },
        })
        .collect()
}

/// The optimizer `--optim` names, over the backend's trainable tensors (`shapes`, in its order).
pub fn build(job: &JobConfig, shapes: &[(String, Vec<usize>)]) -> Result<Box<dyn Optimizer>> {
    let specs = param_specs(shapes, job.training.weight_decay);
    Ok(match job.training.optim {
        Optim::AdamwTorch | Optim::AdamwTorchFused | Optim::Adamw => Box::new(AdamW::new(specs)),
        Optim::Adamw8bit | Optim::PagedAdamw8bit => Box::new(AdamW8bit::new(specs)),
        Optim::Sgd => Box::new(Sgd::new(specs)),
    })
}

/// Checks that the state being imported was written by the same optimizer over the same tensors.
fn check_kind(scalars: &serde_json::Value, kind: &str, specs: &[ParamSpec]) -> Result<()> {
    let found = scalars.get("optimizer").and_then(|v| v.as_str());
    if found != Some(kind) {
        anyhow::bail!(
            "optimizer state was written by {:?}, but this run uses {kind:?}; resume with the \
             same --optim",
            found.unwrap_or("unknown")
        );
    }
    let names: Vec<&str> = scalars
        .get("params")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let expected: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    if names != expected {
        anyhow::bail!(
            "optimizer state covers {} tensors that differ from this run's {} trainable tensors; \
             resume with the same model, --target_modules, --r and --bias",
            names.len(),
            expected.len()
        );
    }
    Ok(())
}

/// Finds tensor `name` in imported state and checks its length and element type.
fn find_f32<'a>(tensors: &'a [(String, HostTensor)], name: &str, len: usize) -> Result<&'a [f32]> {
    let tensor = lookup(tensors, name)?;
    match &tensor.data {
        crate::engine::HostData::F32(v) if v.len() == len => Ok(v),
        crate::engine::HostData::F32(v) => {
            anyhow::bail!("optimizer state {name}: {} values, expected {len}", v.len())
        }
        _ => anyhow::bail!("optimizer state {name}: expected f32 values"),
    }
}

fn find_u8<'a>(tensors: &'a [(String, HostTensor)], name: &str, len: usize) -> Result<&'a [u8]> {
    let tensor = lookup(tensors, name)?;
    match &tensor.data {
        crate::engine::HostData::U8(v) if v.len() == len => Ok(v),
        crate::engine::HostData::U8(v) => {
            anyhow::bail!("optimizer state {name}: {} values, expected {len}", v.len())
        }
        _ => anyhow::bail!("optimizer state {name}: expected u8 values"),
    }
}

fn lookup<'a>(tensors: &'a [(String, HostTensor)], name: &str) -> Result<&'a HostTensor> {
    tensors
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t)
        .ok_or_else(|| anyhow::anyhow!("optimizer state has no tensor {name}"))
}

fn f32_tensor(shape: &[usize], data: Vec<f32>) -> HostTensor {
    HostTensor {
        shape: shape.to_vec(),
        data: crate::engine::HostData::F32(data),
    }
}

/// The scalars every Adam variant writes: its kind, hyper-parameters, tensors and step counts
/// (the 8-bit variant adds its block layout).
fn adam_scalars(kind: &str, specs: &[ParamSpec], steps: &[u64]) -> serde_json::Value {
    serde_json::json!({
        "optimizer": kind,
        "betas": [ADAM_BETAS.0, ADAM_BETAS.1],
        "eps": ADAM_EPSILON,
        "params": specs.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
        "weight_decay": specs.iter().map(|s| s.weight_decay).collect::<Vec<_>>(),
        "steps": steps,
    })
}

/// Appends the fp32 moments of one tensor under torch's state names (`exp_avg`, `exp_avg_sq`).
fn push_moments(tensors: &mut Vec<(String, HostTensor)>, spec: &ParamSpec, m: &[f32], v: &[f32]) {
    tensors.push((
        format!("{}.exp_avg", spec.name),
        f32_tensor(&spec.shape, m.to_vec()),
    ));
    tensors.push((
        format!("{}.exp_avg_sq", spec.name),
        f32_tensor(&spec.shape, v.to_vec()),
    ));
}

/// Reads back what [`push_moments`] wrote for `spec`.
fn read_moments(
    tensors: &[(String, HostTensor)],
    spec: &ParamSpec,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let n = spec.numel();
    Ok((
        find_f32(tensors, &format!("{}.exp_avg", spec.name), n)?.to_vec(),
        find_f32(tensors, &format!("{}.exp_avg_sq", spec.name), n)?.to_vec(),
    ))
}

/// Per-tensor step counts from the scalars blob.
fn read_steps(scalars: &serde_json::Value, count: usize) -> Result<Vec<u64>> {
    let steps: Vec<u64> = scalars
        .get("steps")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
        .unwrap_or_default();
    if steps.len() != count {
        anyhow::bail!(
            "optimizer state has {} step counts, expected {count}",
            steps.len()
        );
    }
    Ok(steps)
}

fn check_index(specs: &[ParamSpec], index: usize, param: &[f32], grad: &[f32]) -> Result<()> {
    let spec = specs.get(index).ok_or_else(|| {
        anyhow::anyhow!(
            "optimizer step for tensor #{index}, but only {} are trainable",
            specs.len()
        )
    })?;
    if param.len() != spec.numel() || grad.len() != spec.numel() {
        anyhow::bail!(
            "optimizer step for {}: parameter has {} and gradient {} values, expected {}",
            spec.name,
            param.len(),
            grad.len(),
            spec.numel()
        );
    }
    Ok(())
}
