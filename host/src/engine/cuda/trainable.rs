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
use ferrotune_kernels::device::{bf16, Adam8bitStates, Kernels, QuantMaps, REDUCE_PARTS};
use ferrotune_kernels::quant::Q8_BLOCK;
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
    /// bitsandbytes AdamW8bit (`adamw_8bit`, `paged_adamw_8bit`) on the GPU.
    Adam8bit(Box<Adam8bit>),
    /// SGD runs the host optimizer on a copy of the gradients (the tensors are small, but each
    /// step pays a device↔host round trip).
    Host(Box<dyn Optimizer>),
}

/// bitsandbytes AdamW8bit state over the arena: tensors of at least `min_8bit_size` (4096)
/// values keep their moments as 8-bit blockwise codes at their arena offsets (tensors start at
/// multiples of 256, so the `adamw_8bit` kernel's blocks are per-tensor, as bitsandbytes');
/// smaller ones (biases, tiny adapters) keep fp32 moments, updated in bitsandbytes' order by
/// `adamw_fp32`. The exported state is the host `AdamW8bit`'s, tensor for tensor.
pub struct Adam8bit {
    /// Per slot: 8-bit (else fp32 moments at `small[i]` in `m_small`/`v_small`).
    blockwise: Vec<bool>,
    small: Vec<usize>,
    m_codes: CudaSlice<u8>,
    m_absmax: CudaSlice<f32>,
    v_codes: CudaSlice<u8>,
    v_absmax: CudaSlice<f32>,
    m_small: CudaSlice<f32>,
    v_small: CudaSlice<f32>,
    maps: QuantMaps,
    steps: u64,
}

impl Adam8bit {
    fn new(
        stream: &Arc<CudaStream>,
        slots: &[Slot],
        specs: &[optim::ParamSpec],
        len: usize,
    ) -> Result<Self> {
        // Which tensors bitsandbytes keeps in 8 bits: the host optimizer decides, one rule.
        let host = optim::AdamW8bit::new(specs.to_vec());
        let blockwise: Vec<bool> = (0..slots.len()).map(|i| host.is_blockwise(i)).collect();
        let mut small = Vec::with_capacity(slots.len());
        let mut small_len = 0;
        for (s, &q) in slots.iter().zip(&blockwise) {
            small.push(small_len);
            if !q {
                small_len += s.numel();
            }
        }
        let blocks = len.div_ceil(Q8_BLOCK);
        Ok(Adam8bit {
            blockwise,
            small,
            m_codes: stream.alloc_zeros(len)?,
            m_absmax: stream.alloc_zeros(blocks)?,
            v_codes: stream.alloc_zeros(len)?,
            v_absmax: stream.alloc_zeros(blocks)?,
            m_small: stream.alloc_zeros(small_len.max(1))?,
            v_small: stream.alloc_zeros(small_len.max(1))?,
            maps: QuantMaps::upload(stream)?,
            steps: 0,
        })
    }
}

/// Runs of consecutive slots that share `key` (same weight decay, same state kind), as
/// `(first slot, last slot, arena start, arena end)`: one optimizer launch each.
fn runs<K: PartialEq>(
    slots: &[Slot],
    len: usize,
    key: impl Fn(usize) -> K,
) -> Vec<(usize, usize, usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < slots.len() {
        let mut j = i;
        while j + 1 < slots.len() && key(j + 1) == key(i) {
            j += 1;
        }
        let end = if j + 1 < slots.len() {
            slots[j + 1].offset
        } else {
            len
        };
        out.push((i, j, slots[i].offset, end));
        i = j + 1;
    }
    out
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
            // Paged states only matter when the optimizer state is large; LoRA's is not, so
            // both names run the same on-device 8-bit optimizer (bitwise the host's update).
            Optim::Adamw8bit | Optim::PagedAdamw8bit => {
                Update::Adam8bit(Box::new(Adam8bit::new(stream, &slots, &specs, len)?))
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
            Update::Adam8bit(q) => {
                q.steps += 1;
                stream.memcpy_htod(&[grad_scale as f32], &mut self.scale)?;
                let blockwise = q.blockwise.clone();
                let slots = &self.slots;
                for (i, j, start, end) in runs(slots, self.len, |k| {
                    (slots[k].weight_decay.to_bits(), blockwise[k])
                }) {
                    let wd = slots[i].weight_decay;
                    let s = AdamStep::bitsandbytes(q.steps, lr, wd, ADAM_BETAS, ADAM_EPSILON);
                    if blockwise[i] {
                        let (b0, b1) = (start / Q8_BLOCK, end.div_ceil(Q8_BLOCK));
                        let mut states = Adam8bitStates {
                            m_codes: q.m_codes.slice_mut(start..end),
                            m_absmax: q.m_absmax.slice_mut(b0..b1),
                            v_codes: q.v_codes.slice_mut(start..end),
                            v_absmax: q.v_absmax.slice_mut(b0..b1),
                        };
                        kernels.adamw_8bit(
                            stream,
                            &mut self.params.slice_mut(start..end),
                            &self.grads.slice(start..end),
                            &mut states,
                            &q.maps,
                            &s,
                            Some(&self.scale.slice(..)),
                            Some(&mut self.shadow.slice_mut(start..end)),
                        )?;
                    } else {
                        // fp32 moments are packed per tensor: one launch per tensor.
                        for (slot, &so) in slots[i..=j].iter().zip(&q.small[i..=j]) {
                            let (off, n) = (slot.offset, slot.numel());
                            kernels.adamw_fp32(
                                stream,
                                &mut self.params.slice_mut(off..off + n),
                                &self.grads.slice(off..off + n),
                                &mut q.m_small.slice_mut(so..so + n),
                                &mut q.v_small.slice_mut(so..so + n),
                                &s,
                                Some(&self.scale.slice(..)),
                                Some(&mut self.shadow.slice_mut(off..off + n)),
                            )?;
                        }
                    }
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
            Update::Adam8bit(q) => Ok(self.export_8bit(stream, q)?),
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
        let len = self.len;
        match &mut self.update {
            Update::Host(opt) => opt.import_state(tensors, scalars),
            Update::Adam8bit(q) => import_8bit(stream, &slots, len, q, tensors, scalars),
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

impl Trainable {
    /// The host `AdamW8bit`'s state format (`optim/adamw_8bit.rs`): `state1`/`absmax1`/
    /// `state2`/`absmax2` for 8-bit tensors, `exp_avg`/`exp_avg_sq` for the others.
    fn export_8bit(
        &self,
        stream: &Arc<CudaStream>,
        q: &Adam8bit,
    ) -> Result<(Vec<(String, HostTensor)>, serde_json::Value)> {
        let (mc, vc) = (
            stream.clone_dtoh(&q.m_codes)?,
            stream.clone_dtoh(&q.v_codes)?,
        );
        let (ma, va) = (
            stream.clone_dtoh(&q.m_absmax)?,
            stream.clone_dtoh(&q.v_absmax)?,
        );
        let (ms, vs) = (
            stream.clone_dtoh(&q.m_small)?,
            stream.clone_dtoh(&q.v_small)?,
        );
        let mut tensors = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            let n = s.numel();
            if q.blockwise[i] {
                let (o, b0, nb) = (s.offset, s.offset / Q8_BLOCK, n.div_ceil(Q8_BLOCK));
                let codes = |c: &[u8]| HostTensor {
                    shape: vec![n],
                    data: HostData::U8(c[o..o + n].to_vec()),
                };
                let absmax = |a: &[f32]| HostTensor {
                    shape: vec![nb],
                    data: HostData::F32(a[b0..b0 + nb].to_vec()),
                };
                tensors.push((format!("{}.state1", s.name), codes(&mc)));
                tensors.push((format!("{}.absmax1", s.name), absmax(&ma)));
                tensors.push((format!("{}.state2", s.name), codes(&vc)));
                tensors.push((format!("{}.absmax2", s.name), absmax(&va)));
            } else {
                let so = q.small[i];
                for (arena, suffix) in [(&ms, "exp_avg"), (&vs, "exp_avg_sq")] {
                    tensors.push((
                        format!("{}.{suffix}", s.name),
                        HostTensor {
                            shape: s.shape.clone(),
                            data: HostData::F32(arena[so..so + n].to_vec()),
                        },
                    ));
                }
            }
        }
        let scalars = serde_json::json!({
            "optimizer": ADAM_8BIT_KIND,
            "betas": [ADAM_BETAS.0, ADAM_BETAS.1],
            "eps": ADAM_EPSILON,
            "params": self.slots.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
            "weight_decay": self.slots.iter().map(|s| s.weight_decay).collect::<Vec<_>>(),
            "steps": vec![q.steps; self.slots.len()],
            "block_size": Q8_BLOCK,
            "min_8bit_size": MIN_8BIT_SIZE,
        });
        Ok((tensors, scalars))
    }
}

/// The host `AdamW8bit`'s kind and small-tensor threshold (its state format's scalars).
const ADAM_8BIT_KIND: &str = "adamw_8bit";
const MIN_8BIT_SIZE: usize = 4096;

fn import_8bit(
    stream: &Arc<CudaStream>,
    slots: &[Slot],
    len: usize,
    q: &mut Adam8bit,
    tensors: &[(String, HostTensor)],
    scalars: &serde_json::Value,
) -> Result<()> {
    let steps = common_steps(scalars, ADAM_8BIT_KIND, slots.len())?;
    let find = |key: &str| -> Result<&HostData> {
        tensors
            .iter()
            .find(|(n, _)| n == key)
            .map(|(_, t)| &t.data)
            .with_context(|| format!("optimizer state has no tensor {key}"))
    };
    let blocks = len.div_ceil(Q8_BLOCK);
    // Padding codes decode to zero whatever the block's absmax: code 0 of the unsigned map and
    // the signed map's zero code, exactly what a zero moment quantises to.
    let zero_m =
        ferrotune_kernels::quant::nearest_code(ferrotune_kernels::quant::signed_map(), 0.0);
    let (mut mc, mut vc) = (vec![zero_m; len], vec![0u8; len]);
    let (mut ma, mut va) = (vec![0f32; blocks], vec![0f32; blocks]);
    let small_len = q.m_small.len();
    let (mut ms, mut vs) = (vec![0f32; small_len], vec![0f32; small_len]);
    for (i, s) in slots.iter().enumerate() {
        let n = s.numel();
        if q.blockwise[i] {
            let (o, b0, nb) = (s.offset, s.offset / Q8_BLOCK, n.div_ceil(Q8_BLOCK));
            for (codes, suffix) in [(&mut mc, "state1"), (&mut vc, "state2")] {
                let key = format!("{}.{suffix}", s.name);
                let HostData::U8(c) = find(&key)? else {
                    bail!("{key}: expected u8 codes")
                };
                ensure!(c.len() == n, "{key}: {} codes, expected {n}", c.len());
                codes[o..o + n].copy_from_slice(c);
            }
            for (absmax, suffix) in [(&mut ma, "absmax1"), (&mut va, "absmax2")] {
                let key = format!("{}.{suffix}", s.name);
                let HostData::F32(a) = find(&key)? else {
                    bail!("{key}: expected f32 values")
                };
                ensure!(a.len() == nb, "{key}: {} values, expected {nb}", a.len());
                absmax[b0..b0 + nb].copy_from_slice(a);
            }
        } else {
            let so = q.small[i];
            for (arena, suffix) in [(&mut ms, "exp_avg"), (&mut vs, "exp_avg_sq")] {
                let key = format!("{}.{suffix}", s.name);
                let HostData::F32(v) = find(&key)? else {
                    bail!("{key}: expected f32 values")
                };
                ensure!(v.len() == n, "{key}: {} values, expected {n}", v.len());
                arena[so..so + n].copy_from_slice(v);
            }
        }
    }
    stream.memcpy_htod(&mc, &mut q.m_codes)?;
    stream.memcpy_htod(&vc, &mut q.v_codes)?;
    stream.memcpy_htod(&ma, &mut q.m_absmax)?;
    stream.memcpy_htod(&va, &mut q.v_absmax)?;
    stream.memcpy_htod(&ms, &mut q.m_small)?;
    stream.memcpy_htod(&vs, &mut q.v_small)?;
    q.steps = steps;
    Ok(())
}

/// Checks the optimizer kind and returns the one step count all tensors share.
fn common_steps(scalars: &serde_json::Value, kind: &str, count: usize) -> Result<u64> {
    let found = scalars.get("optimizer").and_then(|v| v.as_str());
    ensure!(
        found == Some(kind),
        "optimizer state was written by {found:?}, but this run uses {kind:?}; resume with the same --optim"
    );
    let counts: Vec<u64> = scalars
        .get("steps")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
        .unwrap_or_default();
    ensure!(
        counts.len() == count,
        "optimizer state has {} step counts, expected {count}",
        counts.len()
    );
    ensure!(
        counts.iter().all(|&c| c == counts[0]),
        "optimizer state has per-tensor step counts that differ; the cuda engine steps all tensors together"
    );
    Ok(counts[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(name: &str, numel: usize, offset: usize, wd: f64) -> Slot {
        Slot {
            name: name.into(),
            shape: vec![numel],
            offset,
            weight_decay: wd,
        }
    }

    #[test]
    fn optimizer_launches_cover_runs_of_equal_decay_and_state_kind_up_to_the_next_tensor() {
        // bias (small, no decay) | A, B (8-bit, decay) | B of k (small, decay) | bias
        let slots = [
            slot("q.bias", 100, 0, 0.0),
            slot("q.A", 5000, 256, 0.01),
            slot("q.B", 4096, 5376, 0.01),
            slot("k.B", 1024, 9472, 0.01),
            slot("k.bias", 32, 10496, 0.0),
        ];
        let blockwise = [false, true, true, false, false];
        let r = runs(&slots, 10752, |k| {
            (slots[k].weight_decay.to_bits(), blockwise[k])
        });
        assert_eq!(
            r,
            vec![
                (0, 0, 0, 256),
                (1, 2, 256, 9472),
                (3, 3, 9472, 10496),
                (4, 4, 10496, 10752),
            ]
        );
        // Every run of 8-bit tensors starts and ends on a quantisation block.
        assert!(r
            .iter()
            .all(|&(_, _, s, e)| s.is_multiple_of(Q8_BLOCK) && e.is_multiple_of(Q8_BLOCK)));
    }
}
