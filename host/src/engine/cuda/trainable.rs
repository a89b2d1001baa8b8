//! The trainable tensors (LoRA A/B) on the GPU: one flat fp32 arena of master weights, one of
//! gradients, the AdamW moments, and a bf16 shadow of the weights that the GEMMs read (the
//! AdamW kernel rewrites it in the same pass as the update).
//!
//! Tensors sit at multiples of 256 values in the arena, so every tensor starts 16-byte aligned
//! for the GEMMs, and the zero padding between them never changes (zero gradient, zero state).
//! Names, shapes and order are the cpu engine's (`cpu::trainable_shapes`), so checkpoints and
//! exported adapters are interchangeable between backends.

use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use ferrotune_kernels::device::{bf16, Kernels, REDUCE_PARTS};
use ferrotune_kernels::reference::adamw::AdamStep;

use crate::engine::{HostData, HostTensor};
use crate::optim::{self, Optimizer, ADAM_BETAS, ADAM_EPSILON};

/// Alignment of each tensor in the arena, in values.
const ALIGN: usize = 256;

/// One trainable tensor: where it lives in the arena.
#[derive(Debug, Clone)]
pub struct Slot {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub weight_decay: f64,
}

impl Slot {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Which optimizer runs the update.
pub enum Update {
    /// torch AdamW, fp32 moments on the GPU (`adamw_torch`, `adamw_torch_fused`, `adamw`).
    AdamW {
        m: CudaSlice<f32>,
        v: CudaSlice<f32>,
        steps: u64,
    },
    /// Any other `--optim` runs the host optimizer on a copy of the gradients (8-bit AdamW and
    /// SGD; the tensors are small, but each step pays a device↔host round trip).
    Host(Box<dyn Optimizer>),
}

pub struct Trainable {
    pub slots: Vec<Slot>,
    pub len: usize,
    pub params: CudaSlice<f32>,
    pub shadow: CudaSlice<bf16>,
    pub grads: CudaSlice<f32>,
    update: Update,
    partials: CudaSlice<f32>,
    norm: CudaSlice<f32>,
    coef: CudaSlice<f32>,
    scale: CudaSlice<f32>,
}

impl Trainable {
    /// Lays out `shapes` (in order) with initial host values `init` and the optimizer `--optim` names.
    pub fn new(
        stream: &Arc<CudaStream>,
        shapes: &[(String, Vec<usize>)],
        init: &[Vec<f32>],
        job_optim: crate::cli::choices::Optim,
        weight_decay: f64,
    ) -> Result<Self> {
        use crate::cli::choices::Optim;
        let specs = optim::param_specs(shapes, weight_decay);
        let mut slots = Vec::with_capacity(specs.len());
        let mut len = 0;
        for s in &specs {
            slots.push(Slot {
                name: s.name.clone(),
                shape: s.shape.clone(),
                offset: len,
                weight_decay: s.weight_decay,
            });
            len += s.numel().div_ceil(ALIGN) * ALIGN;
        }
        let len = len.max(ALIGN);
        let mut host = vec![0.0f32; len];
        for (slot, values) in slots.iter().zip(init) {
            ensure!(
                values.len() == slot.numel(),
                "initial values of {} have the wrong size",
                slot.name
            );
            host[slot.offset..slot.offset + values.len()].copy_from_slice(values);
        }
        let update = match job_optim {
            Optim::AdamwTorch | Optim::AdamwTorchFused | Optim::Adamw => Update::AdamW {
                m: stream.alloc_zeros(len)?,
                v: stream.alloc_zeros(len)?,
                steps: 0,
            },
            Optim::Adamw8bit | Optim::PagedAdamw8bit => {
                Update::Host(Box::new(optim::AdamW8bit::new(specs.clone())))
            }
            Optim::Sgd => Update::Host(Box::new(optim::Sgd::new(specs.clone()))),
        };
        let shadow_host: Vec<bf16> = host.iter().map(|&x| bf16::from_f32(x)).collect();
        Ok(Trainable {
            params: stream.clone_htod(&host)?,
            shadow: stream.clone_htod(&shadow_host)?,
            grads: stream.alloc_zeros(len)?,
            slots,
            len,
            update,
            partials: stream.alloc_zeros(REDUCE_PARTS)?,
            norm: stream.alloc_zeros(1)?,
            coef: stream.alloc_zeros(1)?,
            scale: stream.alloc_zeros(1)?,
        })
    }

    /// Device address of slot `i`'s bf16 shadow and of its fp32 gradient.
    pub fn ptrs(&self, stream: &CudaStream, i: usize) -> (u64, u64) {
        let off = self.slots[i].offset as u64;
        let (s, _) = self.shadow.device_ptr(stream);
        let (g, _) = self.grads.device_ptr(stream);
        (s + 2 * off, g + 4 * off)
    }

    pub fn grad_norm(&mut self, stream: &Arc<CudaStream>, kernels: &Kernels) -> Result<f64> {
        kernels.grad_norm(
            stream,
            &self.grads.slice(..),
            0.0,
            &mut self.partials.slice_mut(..),
            &mut self.norm.slice_mut(..),
            &mut self.coef.slice_mut(..),
        )?;
        Ok(stream.clone_dtoh(&self.norm)?[0] as f64)
    }

    pub fn step(
        &mut self,
        stream: &Arc<CudaStream>,
        kernels: &Kernels,
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        match &mut self.update {
            Update::AdamW { m, v, steps } => {
                *steps += 1;
                stream.memcpy_htod(&[grad_scale as f32], &mut self.scale)?;
                // One launch per run of consecutive tensors with the same weight decay (LoRA
                // matrices decay, biases do not).
                let mut i = 0;
                while i < self.slots.len() {
                    let wd = self.slots[i].weight_decay;
                    let mut j = i;
                    while j + 1 < self.slots.len() && self.slots[j + 1].weight_decay == wd {
                        j += 1;
                    }
                    let start = self.slots[i].offset;
                    let end = if j + 1 < self.slots.len() {
                        self.slots[j + 1].offset
                    } else {
                        self.len
                    };
                    let s = AdamStep::torch(*steps, lr, wd, ADAM_BETAS, ADAM_EPSILON);
                    kernels.adamw_fp32(
                        stream,
                        &mut self.params.slice_mut(start..end),
                        &self.grads.slice(start..end),
                        &mut m.slice_mut(start..end),
                        &mut v.slice_mut(start..end),
                        &s,
                        Some(&self.scale.slice(..)),
                        Some(&mut self.shadow.slice_mut(start..end)),
                    )?;
                    i = j + 1;
                }
            }
            Update::Host(opt) => {
                let mut params = stream.clone_dtoh(&self.params)?;
                let mut grads = stream.clone_dtoh(&self.grads)?;
                for (i, slot) in self.slots.iter().enumerate() {
                    let r = slot.offset..slot.offset + slot.numel();
                    if grad_scale != 1.0 {
                        grads[r.clone()]
                            .iter_mut()
                            .for_each(|g| *g *= grad_scale as f32);
                    }
                    opt.step(i, &mut params[r.clone()], &grads[r], lr)?;
                }
                self.upload_params(stream, &params)?;
            }
        }
        stream.memset_zeros(&mut self.grads)?;
        Ok(())
    }

    fn upload_params(&mut self, stream: &Arc<CudaStream>, params: &[f32]) -> Result<()> {
        stream.memcpy_htod(params, &mut self.params)?;
        let shadow: Vec<bf16> = params.iter().map(|&x| bf16::from_f32(x)).collect();
        stream.memcpy_htod(&shadow, &mut self.shadow)?;
        Ok(())
    }

    fn gather(&self, arena: &[f32]) -> Vec<(String, HostTensor)> {
        self.slots
            .iter()
            .map(|s| {
                let data = arena[s.offset..s.offset + s.numel()].to_vec();
                (
                    s.name.clone(),
                    HostTensor {
                        shape: s.shape.clone(),
                        data: HostData::F32(data),
                    },
                )
            })
            .collect()
    }

    pub fn export_params(&self, stream: &Arc<CudaStream>) -> Result<Vec<(String, HostTensor)>> {
        Ok(self.gather(&stream.clone_dtoh(&self.params)?))
    }

    pub fn export_grads(&self, stream: &Arc<CudaStream>) -> Result<Vec<(String, HostTensor)>> {
        Ok(self.gather(&stream.clone_dtoh(&self.grads)?))
    }

    pub fn import_params(
        &mut self,
        stream: &Arc<CudaStream>,
        tensors: &[(String, HostTensor)],
    ) -> Result<()> {
        ensure!(
            tensors.len() == self.slots.len(),
            "checkpoint has {} trainable tensors, this model/LoRA setup has {} (other --r, \
             --target_modules or --bias?)",
            tensors.len(),
            self.slots.len()
        );
        let mut host = stream.clone_dtoh(&self.params)?;
        for (slot, (name, t)) in self.slots.iter().zip(tensors) {
            ensure!(
                name == &slot.name,
                "checkpoint tensor {name} where {} was expected",
                slot.name
            );
            ensure!(
                t.shape == slot.shape,
                "{name}: shape {:?}, expected {:?}",
                t.shape,
                slot.shape
            );
            let HostData::F32(v) = &t.data else {
                bail!("{name}: expected f32 values")
            };
            host[slot.offset..slot.offset + v.len()].copy_from_slice(v);
        }
        self.upload_params(stream, &host)
    }

    pub fn export_optimizer(
        &self,
        stream: &Arc<CudaStream>,
    ) -> Result<(Vec<(String, HostTensor)>, serde_json::Value)> {
        match &self.update {
            Update::Host(opt) => Ok(opt.export_state()),
            Update::AdamW { m, v, steps } => {
                // The host AdamW's format (`optim::adamw`), so checkpoints move between backends.
                let (m, v) = (stream.clone_dtoh(m)?, stream.clone_dtoh(v)?);
                let mut tensors = Vec::with_capacity(2 * self.slots.len());
                for (arena, suffix) in [(&m, "exp_avg"), (&v, "exp_avg_sq")] {
                    for (name, t) in self.gather(arena) {
                        tensors.push((format!("{name}.{suffix}"), t));
                    }
                }
                let scalars = serde_json::json!({
                    "optimizer": "adamw",
                    "betas": [ADAM_BETAS.0, ADAM_BETAS.1],
                    "eps": ADAM_EPSILON,
                    "params": self.slots.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
                    "weight_decay": self.slots.iter().map(|s| s.weight_decay).collect::<Vec<_>>(),
                    "steps": vec![*steps; self.slots.len()],
                });
                Ok((tensors, scalars))
            }
        }
    }

    pub fn import_optimizer(
        &mut self,
        stream: &Arc<CudaStream>,
        tensors: &[(String, HostTensor)],
        scalars: &serde_json::Value,
    ) -> Result<()> {
        let slots = self.slots.clone();
        match &mut self.update {
            Update::Host(opt) => opt.import_state(tensors, scalars),
            Update::AdamW { m, v, steps } => {
                let kind = scalars.get("optimizer").and_then(|v| v.as_str());
                ensure!(
                    kind == Some("adamw"),
                    "optimizer state was written by {kind:?}, but this run uses \"adamw\"; resume with the same --optim"
                );
                let counts: Vec<u64> = scalars
                    .get("steps")
                    .and_then(|v| v.as_array())
                    .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
                    .unwrap_or_default();
                ensure!(
                    counts.len() == slots.len(),
                    "optimizer state has {} step counts, expected {}",
                    counts.len(),
                    slots.len()
                );
                ensure!(
                    counts.iter().all(|&c| c == counts[0]),
                    "optimizer state has per-tensor step counts that differ; the cuda engine steps all tensors together"
                );
                for (arena, suffix) in [(&mut *m, "exp_avg"), (&mut *v, "exp_avg_sq")] {
                    let mut host = vec![0.0f32; self.len];
                    for s in &slots {
                        let key = format!("{}.{suffix}", s.name);
                        let t = tensors
                            .iter()
                            .find(|(n, _)| *n == key)
                            .map(|(_, t)| t)
                            .with_context(|| format!("optimizer state has no tensor {key}"))?;
                        let HostData::F32(vals) = &t.data else {
                            bail!("{key}: expected f32 values")
                        };
                        ensure!(
                            vals.len() == s.numel(),
                            "{key}: {} values, expected {}",
                            vals.len(),
                            s.numel()
                        );
                        host[s.offset..s.offset + vals.len()].copy_from_slice(vals);
                    }
                    stream.memcpy_htod(&host, arena)?;
                }
                *steps = counts[0];
                Ok(())
            }
        }
    }
}
