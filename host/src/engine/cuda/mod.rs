//! The cuda backend (feature `cuda`): the whole LoRA training step on one NVIDIA GPU.
//!
//! - Frozen base weights bf16 on the device (straight from the safetensors mmap, [`weights`]);
//!   LoRA A/B and their optimizer state fp32, with bf16 shadows for the GEMMs ([`trainable`]).
//! - Every product through cuBLASLt ([`gemm`]), bf16 operands with fp32 accumulation, LoRA
//!   low-rank first ([`linear`]); frozen weights never get a gradient.
//! - Own kernels (`ferrotune-kernels`, compiled with NVRTC at start and cached on disk) for
//!   RMSNorm, RoPE, SwiGLU, the masked attention softmax, chunked cross-entropy, AdamW, grad norm.
//! - Activations preallocated per batch shape ([`buffers`]); the backward updates one residual
//!   gradient buffer in place; `--use_gradient_checkpointing` recomputes each layer from its
//!   input.
//!
//! The math is the cpu engine's (`engine/cpu`, the reference); `docs/engine.md` has the CUDA
//! section with the data flow and what is not built yet.

mod attention;
mod buffers;
mod gemm;
mod linear;
mod trainable;
mod weights;

use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr};
use ferrotune_kernels::cache::KernelCache;
use ferrotune_kernels::device::{bf16, Kernels};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use self::buffers::{Buffers, LayerActs, Sizes};
use self::gemm::Gemm;
use self::linear::{Linear, Lora};
use self::trainable::Trainable;
use self::weights::WeightFiles;
use crate::cli::choices::{Bias, GradientCheckpointing};
use crate::engine::cpu::{kaiming_uniform, rope::Rope, trainable_shapes, EngineOptions};
use crate::engine::{optimizer_state, Backend, Batch, HostTensor, MemoryStats, PassStats, IGNORE};
use crate::job::{JobConfig, PROJECTIONS};
use crate::model::ModelConfig;

const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

/// Why no GPU can be used, or the device that can.
pub fn probe() -> std::result::Result<String, String> {
    // SAFETY: only dlopens the libraries to see whether they exist.
    let (cuda, nvrtc, lt) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
            cudarc::cublaslt::sys::is_culib_present(),
        )
    };
    if !cuda {
        return Err("no NVIDIA driver (libcuda.so) found".into());
    }
    let count = cudarc::driver::result::init()
        .and_then(|_| cudarc::driver::result::device::get_count())
        .map_err(|e| format!("the CUDA driver reports no usable device ({e})"))?;
    if count < 1 {
        return Err("the CUDA driver sees no GPU".into());
    }
    if !nvrtc {
        return Err("libnvrtc (CUDA runtime compiler) not found on the library path".into());
    }
    if !lt {
        return Err("libcublasLt not found on the library path".into());
    }
    let ctx = CudaContext::new(0).map_err(|e| format!("cannot open GPU 0: {e}"))?;
    let name = ctx.name().unwrap_or_else(|_| "GPU 0".into());
    let (major, minor) = ctx.compute_capability().map_err(|e| e.to_string())?;
    if major < 8 {
        return Err(format!(
            "{name} is sm_{major}{minor}; the cuda engine needs sm_80 or newer (bf16 tensor cores)"
        ));
    }
    Ok(format!("{name} (sm_{major}{minor})"))
}

/// One layer's frozen weights on the device.
struct LayerWeights {
    norm1: CudaSlice<bf16>,
    norm2: CudaSlice<bf16>,
    /// In [`PROJECTIONS`] order, bf16 `[out, in]`.
    proj: Vec<CudaSlice<bf16>>,
    /// `(A, B)` slot indices in the trainable arena per projection.
    lora: Vec<Option<(usize, usize)>>,
}

/// The cuda training backend.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    gemm: Gemm,
    cfg: ModelConfig,
    options: EngineOptions,
    embed: CudaSlice<bf16>,
    /// `None` when tied to the embedding.
    lm_head: Option<CudaSlice<bf16>>,
    final_norm: CudaSlice<bf16>,
    layers: Vec<LayerWeights>,
    inv_freq: CudaSlice<f32>,
    train: Trainable,
    bufs: Option<Buffers>,
    /// Layer inputs parked in pinned host memory (`--use_gradient_checkpointing unsloth`).
    offload: bool,
    frozen_numel: usize,
    /// Device memory free before this backend allocated anything (bytes).
    free_at_start: usize,
    peak_used: usize,
    device_name: String,
}

impl CudaBackend {
    /// Loads the model in `dir` onto GPU 0 for `job`.
    pub fn from_job(dir: &std::path::Path, job: &JobConfig) -> Result<Self> {
        let options = EngineOptions::from_job(job);
        let cfg = ModelConfig::from_dir(dir)?;
        if job.model.load_in_4bit {
            bail!("--load_in_4bit is not built in the cuda engine yet (NF4 kernels exist; the loader does not use them): drop the flag");
        }
        let mut backend = Self::new(
            dir,
            cfg,
            options,
            job.training.optim,
            job.training.weight_decay,
        )?;
        backend
            .set_offload(job.lora.use_gradient_checkpointing == GradientCheckpointing::Unsloth)?;
        Ok(backend)
    }

    /// `--use_gradient_checkpointing unsloth`: keep each layer's input in pinned host memory
    /// instead of on the GPU (copies overlap the compute on a side stream).
    pub fn set_offload(&mut self, on: bool) -> Result<()> {
        ensure!(
            !on || self.options.gradient_checkpointing,
            "offloading layer inputs needs gradient checkpointing"
        );
        if on != self.offload {
            self.offload = on;
            self.bufs = None;
        }
        Ok(())
    }

    pub fn new(
        dir: &std::path::Path,
        cfg: ModelConfig,
        options: EngineOptions,
        optim: crate::cli::choices::Optim,
        weight_decay: f64,
    ) -> Result<Self> {
        check_supported(&cfg, &options)?;
        let device_name = probe().map_err(|why| anyhow::anyhow!("--device cuda: {why}"))?;
        let ctx = CudaContext::new(0)?;
        // One stream orders everything; per-buffer event tracking would only add overhead.
        // SAFETY: no other stream touches these buffers.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let (free_at_start, _) = ctx.mem_get_info()?;
        let cache = ferrotune_kernels::cache::default_dir().map(KernelCache::new);
        let (kernels, report) =
            Kernels::load(&ctx, cache.as_ref()).context("loading the CUDA kernels")?;
        tracing::info!(
            target = %report.target,
            compiled = report.compiled.len(),
            cached = report.cached.len(),
            "cuda kernels ready on {device_name}"
        );
        let gemm = Gemm::new(stream.clone())?;

        let files = WeightFiles::open(dir)?;
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = files.upload(&stream, "model.embed_tokens.weight", &[v, h])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(files.upload(&stream, "lm_head.weight", &[v, h])?)
        };
        let final_norm = files.upload(&stream, "model.norm.weight", &[h])?;

        let shapes = trainable_shapes(&cfg, &options)?;
        let mut rng = ChaCha8Rng::seed_from_u64(options.init_seed);
        let mut init = Vec::with_capacity(shapes.len());
        for (name, shape) in &shapes {
            // The cpu engine's initialisation, drawn in the same order: A kaiming-uniform, B zero.
            if name.ends_with("lora_A.weight") {
                init.push(kaiming_uniform(&mut rng, shape[0], shape[1]));
            } else {
                init.push(vec![0.0; shape.iter().product()]);
            }
        }
        let train = Trainable::new(&stream, &shapes, &init, optim, weight_decay)?;
        let slot = |name: &str| train.slots.iter().position(|s| s.name == name);

        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut proj = Vec::with_capacity(7);
            let mut lora = Vec::with_capacity(7);
            for name in PROJECTIONS {
                let group = if matches!(name, "q_proj" | "k_proj" | "v_proj" | "o_proj") {
                    "self_attn"
                } else {
                    "mlp"
                };
                let (inp, out) = cfg.projection_shape(name).expect("known projection");
                proj.push(files.upload(
                    &stream,
                    &format!("{p}.{group}.{name}.weight"),
                    &[out, inp],
                )?);
                let peft = format!("base_model.model.{p}.{group}.{name}");
                lora.push(
                    slot(&format!("{peft}.lora_A.weight"))
                        .zip(slot(&format!("{peft}.lora_B.weight"))),
                );
            }
            layers.push(LayerWeights {
                norm1: files.upload(&stream, &format!("{p}.input_layernorm.weight"), &[h])?,
                norm2: files.upload(
                    &stream,
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[h],
                )?,
                proj,
                lora,
            });
        }
        let inv_freq = stream.clone_htod(Rope::new(&cfg).inv_freq())?;
        stream.synchronize()?;
        let mut backend = CudaBackend {
            frozen_numel: files.numel()?,
            ctx,
            stream,
            kernels,
            gemm,
            cfg,
            options,
            embed,
            lm_head,
            final_norm,
            layers,
            inv_freq,
            train,
            bufs: None,
            offload: false,
            free_at_start,
            peak_used: 0,
            device_name,
        };
        backend.sample_memory()?;
        Ok(backend)
    }

    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Scalars in the model: frozen base weights plus trainable tensors.
    pub fn num_params(&self) -> usize {
        self.frozen_numel + self.num_trainable()
    }

    pub fn num_trainable(&self) -> usize {
        self.train.slots.iter().map(|s| s.numel()).sum()
    }

    /// The accumulated gradients by PEFT name (parity tests, debugging).
    pub fn gradients(&self) -> Result<Vec<(String, HostTensor)>> {
        self.train.export_grads(&self.stream)
    }

    fn sample_memory(&mut self) -> Result<()> {
        let (free, _) = self.ctx.mem_get_info()?;
        self.peak_used = self.peak_used.max(self.free_at_start.saturating_sub(free));
        Ok(())
    }

    fn check_batch(&self, batch: &Batch) -> Result<()> {
        let n = batch.batch_size * batch.seq_len;
        ensure!(n > 0, "empty batch");
        for (what, len) in [
            ("input_ids", batch.input_ids.len()),
            ("targets", batch.targets.len()),
            ("position_ids", batch.position_ids.len()),
            ("segment_ids", batch.segment_ids.len()),
        ] {
            ensure!(
                len == n,
                "batch {what} has {len} entries, expected batch_size·seq_len = {n}"
            );
        }
        let vocab = self.cfg.vocab_size;
        if let Some(id) = batch.input_ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("token id {id} is outside the model's vocabulary ({vocab}); tokenizer and model do not match");
        }
        if let Some(t) = batch
            .targets
            .iter()
            .find(|&&t| t != IGNORE && (t < 0 || t as usize >= vocab))
        {
            bail!("target {t} is outside the model's vocabulary ({vocab}) and is not -100");
        }
        Ok(())
    }

    fn dims(&self, batch: usize, seq: usize) -> attention::Dims {
        attention::Dims {
            batch,
            seq,
            heads: self.cfg.num_attention_heads,
            kv_heads: self.cfg.num_key_value_heads,
            head_dim: self.cfg.head_dim,
            window: self.cfg.sliding_window.unwrap_or(0),
        }
    }

    /// Buffers for this batch shape (reallocated only when the shape changes).
    fn prepare(&mut self, batch: &Batch) -> Result<()> {
        let sizes = Sizes::new(&self.cfg, batch.batch_size, batch.seq_len, self.options.r);
        if self.bufs.as_ref().map(|b| b.sizes) != Some(sizes) {
            self.bufs = None;
            let dims = self.dims(batch.batch_size, batch.seq_len);
            let keep_all = !self.options.gradient_checkpointing;
            self.bufs = Some(Buffers::new(
                &self.ctx,
                &self.stream,
                sizes,
                self.cfg.num_hidden_layers,
                keep_all,
                self.offload,
                &dims,
            )?);
        }
        let b = self.bufs.as_mut().expect("just allocated");
        let s = &self.stream;
        s.memcpy_htod(&batch.input_ids, &mut b.ids)?;
        s.memcpy_htod(&batch.position_ids, &mut b.positions)?;
        s.memcpy_htod(&batch.segment_ids, &mut b.segments)?;
        s.memcpy_htod(&batch.targets, &mut b.targets)?;
        self.kernels.rope_cos_sin(
            s,
            &b.positions.slice(..),
            &self.inv_freq.slice(..),
            &mut b.cos.slice_mut(..),
            &mut b.sin.slice_mut(..),
        )?;
        Ok(())
    }

    fn linear(&self, l: usize, j: usize, tokens: usize, acts: &LayerActs) -> Linear {
        let (inp, out) = self
            .cfg
            .projection_shape(PROJECTIONS[j])
            .expect("known projection");
        let w = self.layers[l].proj[j].device_ptr(&self.stream).0;
        let lora = self.layers[l].lora[j].map(|(ia, ib)| {
            let (a, grad_a) = self.train.ptrs(&self.stream, ia);
            let (b, grad_b) = self.train.ptrs(&self.stream, ib);
            Lora {
                a,
                b,
                grad_a,
                grad_b,
                low: acts.low(&self.stream, j, tokens, self.options.r),
                r: self.options.r,
                scale: self.options.lora_scale() as f32,
            }
        });
        Linear {
            n: tokens,
            inp,
            out,
            w,
            lora,
        }
    }

    /// Layer `l` forward from its input into the next layer's input (`to_next`) or, for a
    /// checkpointing recompute that only needs the activations, into the `dn` scratch;
    /// activations go to `acts[slot]`.
    fn layer_forward_in(
        &mut self,
        b: &mut Buffers,
        l: usize,
        slot: usize,
        to_next: bool,
    ) -> Result<()> {
        let s = self.stream.clone();
        let sz = b.sizes;
        let (n, hd) = (sz.tokens, sz.hidden);
        let eps = self.cfg.rms_norm_eps as f32;
        let ptr16 = |x: &CudaSlice<bf16>| x.device_ptr(&s).0;
        let (xi, yi) = (b.x_index(l), b.x_index(l + 1));
        let (x, y) = if to_next {
            input_and_output(&mut b.xs, xi, yi)
        } else {
            (&b.xs[xi], &mut b.dn)
        };
        let a = &mut b.acts[slot];
        let w = &self.layers[l];
        self.kernels.rmsnorm_fwd(
            &s,
            &x.slice(..),
            &w.norm1.slice(..),
            &mut b.norm.slice_mut(..),
            &mut a.rstd1.slice_mut(..),
            n,
            hd,
            eps,
        )?;
        let lin = |j| self.linear(l, j, n, a);
        let (q, k, v, o, gate, up, down) = (
            lin(Q),
            lin(K),
            lin(V),
            lin(O),
            lin(GATE),
            lin(UP),
            lin(DOWN),
        );
        let (n1, qp, kp, vp) = (ptr16(&b.norm), ptr16(&a.q), ptr16(&a.k), ptr16(&a.v));
        q.forward(&mut self.gemm, n1, qp, None)?;
        k.forward(&mut self.gemm, n1, kp, None)?;
        v.forward(&mut self.gemm, n1, vp, None)?;
        let (nh, nkv, d) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        );
        self.kernels.rope_apply(
            &s,
            &mut a.q.slice_mut(..),
            sz.qd,
            nh,
            Some((&mut a.k.slice_mut(..), sz.kvd, nkv)),
            &b.cos.slice(..),
            &b.sin.slice(..),
            n,
            d,
            false,
        )?;
        let dims = self.dims(sz.batch, sz.seq);
        attention::forward(
            &s,
            &self.kernels,
            &mut self.gemm,
            &dims,
            (qp, kp, vp),
            ptr16(&a.attn),
            &b.segments,
            &mut b.attn,
        )?;
        o.forward(&mut self.gemm, ptr16(&a.attn), ptr16(&a.h), Some(ptr16(x)))?;
        self.kernels.rmsnorm_fwd(
            &s,
            &a.h.slice(..),
            &w.norm2.slice(..),
            &mut b.norm.slice_mut(..),
            &mut a.rstd2.slice_mut(..),
            n,
            hd,
            eps,
        )?;
        gate.forward(&mut self.gemm, ptr16(&b.norm), ptr16(&a.gate), None)?;
        up.forward(&mut self.gemm, ptr16(&b.norm), ptr16(&a.up), None)?;
        let i = sz.inter;
        self.kernels.swiglu_fwd(
            &s,
            (&a.gate.slice(..), i),
            (&a.up.slice(..), i),
            (&mut b.act.slice_mut(..), i),
            n,
            i,
        )?;
        down.forward(&mut self.gemm, ptr16(&b.act), ptr16(y), Some(ptr16(&a.h)))?;
        Ok(())
    }

    /// Layer `l` backward: `dres` holds ∂L/∂xs[l+1] on entry and ∂L/∂xs[l] on return (layer 0
    /// skips the input gradient: the embedding is frozen).
    fn layer_backward_in(&mut self, b: &mut Buffers, l: usize, slot: usize) -> Result<()> {
        let s = self.stream.clone();
        let sz = b.sizes;
        let (n, hd, i) = (sz.tokens, sz.hidden, sz.inter);
        let eps = self.cfg.rms_norm_eps as f32;
        let p16 = |x: &CudaSlice<bf16>| x.device_ptr(&s).0;
        let xi = b.x_index(l);
        let a = &mut b.acts[slot];
        let w = &self.layers[l];
        let lin = |j| self.linear(l, j, n, a);
        let (q, k, v, o, gate, up, down) = (
            lin(Q),
            lin(K),
            lin(V),
            lin(O),
            lin(GATE),
            lin(UP),
            lin(DOWN),
        );
        let dims = self.dims(sz.batch, sz.seq);
        let g = &mut self.gemm;
        let t = p16(&b.t);

        // MLP half: d_act = dOut·Wd (+LoRA); SwiGLU backward in place (gate/up become their
        // gradients, act is recomputed for dA of the down projection).
        down.backward(g, p16(&b.dres), Some((p16(&b.d_act), false)), t)?;
        self.kernels.swiglu_bwd(
            &s,
            (&b.d_act.slice(..), i),
            (&mut a.gate.slice_mut(..), i),
            (&mut a.up.slice_mut(..), i),
            Some((&mut b.act.slice_mut(..), i)),
            n,
            i,
        )?;
        down.grad_a(g, p16(&b.act), t)?;
        // n2 again (not kept by the forward); rstd2 is rewritten with the same values.
        self.kernels.rmsnorm_fwd(
            &s,
            &a.h.slice(..),
            &w.norm2.slice(..),
            &mut b.norm.slice_mut(..),
            &mut a.rstd2.slice_mut(..),
            n,
            hd,
            eps,
        )?;
        gate.backward(g, p16(&a.gate), Some((p16(&b.dn), false)), t)?;
        gate.grad_a(g, p16(&b.norm), t)?;
        up.backward(g, p16(&a.up), Some((p16(&b.dn), true)), t)?;
        up.grad_a(g, p16(&b.norm), t)?;
        self.kernels.rmsnorm_bwd(
            &s,
            &a.h.slice(..),
            &w.norm2.slice(..),
            &a.rstd2.slice(..),
            &b.dn.slice(..),
            &mut b.dres.slice_mut(..),
            n,
            hd,
            true,
        )?;

        // Attention half.
        o.backward(g, p16(&b.dres), Some((p16(&b.d_attn), false)), t)?;
        o.grad_a(g, p16(&a.attn), t)?;
        attention::backward(
            &s,
            &self.kernels,
            g,
            &dims,
            (p16(&a.q), p16(&a.k), p16(&a.v)),
            p16(&b.d_attn),
            (p16(&b.dq), p16(&b.dk), p16(&b.dv)),
            &b.segments,
            &mut b.attn,
        )?;
        let (nh, nkv, d) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        );
        self.kernels.rope_apply(
            &s,
            &mut b.dq.slice_mut(..),
            sz.qd,
            nh,
            Some((&mut b.dk.slice_mut(..), sz.kvd, nkv)),
            &b.cos.slice(..),
            &b.sin.slice(..),
            n,
            d,
            true,
        )?;
        let need_dx = l > 0;
        let dn = p16(&b.dn);
        // n1 again, for the q/k/v adapters' dA.
        self.kernels.rmsnorm_fwd(
            &s,
            &b.xs[xi].slice(..),
            &w.norm1.slice(..),
            &mut b.norm.slice_mut(..),
            &mut a.rstd1.slice_mut(..),
            n,
            hd,
            eps,
        )?;
        for (lin, dy, acc) in [
            (&q, p16(&b.dq), false),
            (&k, p16(&b.dk), true),
            (&v, p16(&b.dv), true),
        ] {
            lin.backward(g, dy, need_dx.then_some((dn, acc)), t)?;
            lin.grad_a(g, p16(&b.norm), t)?;
        }
        if need_dx {
            let x = &b.xs[xi];
            self.kernels.rmsnorm_bwd(
                &s,
                &x.slice(..),
                &w.norm1.slice(..),
                &a.rstd1.slice(..),
                &b.dn.slice(..),
                &mut b.dres.slice_mut(..),
                n,
                hd,
                true,
            )?;
        }
        Ok(())
    }

    /// Final norm, chunked LM head and cross-entropy; with `loss_scale`, also ∂L/∂xs[L] into
    /// `dres`. Returns the loss sum.
    fn head(&mut self, b: &mut Buffers, loss_scale: Option<f32>) -> Result<f64> {
        let s = self.stream.clone();
        let sz = b.sizes;
        let (n, hd, vocab) = (sz.tokens, sz.hidden, sz.vocab);
        let eps = self.cfg.rms_norm_eps as f32;
        let last = &b.xs[b.x_index(self.cfg.num_hidden_layers)];
        self.kernels.rmsnorm_fwd(
            &s,
            &last.slice(..),
            &self.final_norm.slice(..),
            &mut b.hn.slice_mut(..),
            &mut b.rstd_f.slice_mut(..),
            n,
            hd,
            eps,
        )?;
        let w = self
            .lm_head
            .as_ref()
            .unwrap_or(&self.embed)
            .device_ptr(&s)
            .0;
        let (hn, logits, dn) = (
            b.hn.device_ptr(&s).0,
            b.logits.device_ptr(&s).0,
            b.dn.device_ptr(&s).0,
        );
        let mut r0 = 0;
        while r0 < n {
            let rows = sz.ce_rows.min(n - r0);
            let off = (2 * r0 * hd) as u64;
            let p = gemm::Problem {
                m: rows,
                n: vocab,
                k: hd,
                batch: 1,
                a: gemm::Operand::new(hn + off, hd),
                b: gemm::Operand::new(w, hd).t(),
                d: gemm::Output::new(logits, vocab, gemm::OutType::Bf16),
                alpha: 1.0,
                beta: 0.0,
            };
            // SAFETY: hn is [N, H], the LM head [V, H], logits [ce_rows, V].
            unsafe { self.gemm.run(&p)? };
            let targets = b.targets.slice(r0..r0 + rows);
            self.kernels.ce_stats(
                &s,
                &b.logits.slice(..),
                vocab,
                rows,
                0,
                vocab,
                &targets,
                &mut b.ce,
                true,
                true,
            )?;
            s.memcpy_dtod(
                &b.ce.loss.slice(..rows),
                &mut b.losses.slice_mut(r0..r0 + rows),
            )?;
            if let Some(scale) = loss_scale {
                self.kernels.ce_grad(
                    &s,
                    &mut b.logits.slice_mut(..),
                    vocab,
                    rows,
                    0,
                    vocab,
                    &targets,
                    &b.ce.lse.slice(..),
                    scale,
                )?;
                let p = gemm::Problem {
                    m: rows,
                    n: hd,
                    k: vocab,
                    batch: 1,
                    a: gemm::Operand::new(logits, vocab),
                    b: gemm::Operand::new(w, hd),
                    d: gemm::Output::new(dn + off, hd, gemm::OutType::Bf16),
                    alpha: 1.0,
                    beta: 0.0,
                };
                // SAFETY: as above; dn is [N, H].
                unsafe { self.gemm.run(&p)? };
            }
            r0 += rows;
        }
        if loss_scale.is_some() {
            self.kernels.rmsnorm_bwd(
                &s,
                &last.slice(..),
                &self.final_norm.slice(..),
                &b.rstd_f.slice(..),
                &b.dn.slice(..),
                &mut b.dres.slice_mut(..),
                n,
                hd,
                false,
            )?;
        }
        self.kernels.sum(
            &s,
            &b.losses.slice(..),
            1.0,
            &mut b.partials.slice_mut(..),
            &mut b.loss_sum.slice_mut(..),
        )?;
        Ok(s.clone_dtoh(&b.loss_sum)?[0] as f64)
    }

    fn pass(&mut self, batch: &Batch, loss_scale: Option<f32>) -> Result<PassStats> {
        self.check_batch(batch)?;
        self.prepare(batch)?;
        let mut bufs = self.bufs.take().expect("prepared");
        let result = self.pass_in(&mut bufs, loss_scale);
        self.bufs = Some(bufs);
        let loss_sum = result?;
        self.sample_memory()?;
        Ok(PassStats {
            loss_sum,
            tokens: batch.trainable_tokens(),
        })
    }

    fn pass_in(&mut self, b: &mut Buffers, loss_scale: Option<f32>) -> Result<f64> {
        let layers = self.cfg.num_hidden_layers;
        let train = loss_scale.is_some();
        let keep_all = train && !self.options.gradient_checkpointing;
        let offload = train && b.offload.is_some();
        let x0 = b.x_index(0);
        self.kernels.embedding_gather(
            &self.stream,
            &b.ids.slice(..),
            &self.embed.slice(..),
            &mut b.xs[x0].slice_mut(..),
            self.cfg.hidden_size,
        )?;
        // Offload: layer l's input goes out right after it is produced; layer l then writes
        // its output over layer l-1's input, which must have reached the host by then.
        let mut parked: Vec<Option<CudaEvent>> = (0..layers).map(|_| None).collect();
        for l in 0..layers {
            if offload {
                parked[l] = Some(self.park(b, l)?);
                if let Some(done) = l.checked_sub(1).and_then(|p| parked[p].take()) {
                    self.stream.wait(&done)?;
                }
            }
            self.layer_forward_in(b, l, if keep_all { l } else { 0 }, true)?;
        }
        let loss = self.head(b, loss_scale)?;
        if train {
            // Offload: the last layer's input is still on the GPU; each layer's backward
            // fetches the input of the layer below into the buffer it no longer needs.
            let mut fetched: Option<CudaEvent> = None;
            for l in (0..layers).rev() {
                if offload {
                    if let Some(ready) = fetched.take() {
                        self.stream.wait(&ready)?;
                    }
                    if l > 0 {
                        fetched = Some(self.fetch(b, l - 1)?);
                    }
                }
                let slot = if keep_all {
                    l
                } else {
                    self.layer_forward_in(b, l, 0, false)?;
                    0
                };
                self.layer_backward_in(b, l, slot)?;
            }
        }
        Ok(loss)
    }

    /// Copies layer `l`'s input to pinned host memory on the side stream, after the main
    /// stream's work so far; returns the copy's completion.
    fn park(&self, b: &mut Buffers, l: usize) -> Result<CudaEvent> {
        let i = b.x_index(l);
        let off = b.offload.as_mut().expect("offload buffers");
        off.side.wait(&self.stream.record_event(None)?)?;
        off.side.memcpy_dtoh(&b.xs[i], &mut off.host[l])?;
        Ok(off.side.record_event(None)?)
    }

    /// Copies layer `l`'s input back from pinned host memory on the side stream, after the
    /// main stream's work so far (the buffer's previous contents are dead); returns its completion.
    fn fetch(&self, b: &mut Buffers, l: usize) -> Result<CudaEvent> {
        let i = b.x_index(l);
        let off = b.offload.as_mut().expect("offload buffers");
        off.side.wait(&self.stream.record_event(None)?)?;
        off.side.memcpy_htod(&off.host[l], &mut b.xs[i])?;
        Ok(off.side.record_event(None)?)
    }
}

/// `(&v[i], &mut v[j])` for `i != j`.
fn input_and_output<T>(v: &mut [T], i: usize, j: usize) -> (&T, &mut T) {
    assert_ne!(i, j, "a layer's input and output buffers must differ");
    if i < j {
        let (lo, hi) = v.split_at_mut(j);
        (&lo[i], &mut hi[0])
    } else {
        let (lo, hi) = v.split_at_mut(i);
        (&hi[0], &mut lo[j])
    }
}

/// What this version of the cuda engine computes; the rest fails here, loudly, before loading.
fn check_supported(cfg: &ModelConfig, o: &EngineOptions) -> Result<()> {
    let not_yet = |what: &str| -> Result<()> {
        bail!("{what} is not built in the cuda engine yet; run with --device cpu")
    };
    if cfg.qkv_bias || cfg.o_bias || cfg.mlp_bias {
        not_yet(&format!("{} projection biases", cfg.model_type))?;
    }
    if cfg.qk_norm {
        not_yet("Qwen3's q/k norm")?;
    }
    if o.lora_dropout > 0.0 {
        not_yet("--lora_dropout > 0")?;
    }
    if o.bias != Bias::None && (cfg.qkv_bias || cfg.o_bias || cfg.mlp_bias) {
        not_yet("trainable biases (--bias)")?;
    }
    ensure!(o.r > 0, "--r must be positive");
    let h = cfg.hidden_size;
    ensure!(
        h.is_multiple_of(8)
            && cfg.intermediate_size.is_multiple_of(8)
            && cfg.head_dim.is_multiple_of(8),
        "the cuda engine needs hidden_size, intermediate_size and head_dim to be multiples of 8"
    );
    Ok(())
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn forward_backward(&mut self, batch: &Batch, loss_scale: f32) -> Result<PassStats> {
        self.pass(batch, Some(loss_scale))
    }

    fn eval_loss(&mut self, batch: &Batch) -> Result<PassStats> {
        self.pass(batch, None)
    }

    fn grad_norm(&mut self) -> Result<f64> {
        self.train.grad_norm(&self.stream, &self.kernels)
    }

    fn optimizer_step(&mut self, lr: f64, grad_scale: f64) -> Result<()> {
        self.train.step(&self.stream, &self.kernels, lr, grad_scale)
    }

    fn export_trainable(&self) -> Result<Vec<(String, HostTensor)>> {
        self.train.export_params(&self.stream)
    }

    fn import_trainable(&mut self, params: &[(String, HostTensor)]) -> Result<()> {
        self.train.import_params(&self.stream, params)
    }

    fn export_optimizer(&self) -> Result<(Vec<(String, HostTensor)>, serde_json::Value)> {
        let (tensors, scalars) = self.train.export_optimizer(&self.stream)?;
        // The engine-neutral format; no forward-pass count: this engine draws no dropout masks.
        let counters = optimizer_state::EngineCounters::default();
        Ok((tensors, optimizer_state::pack(scalars, counters)))
    }

    fn import_optimizer(
        &mut self,
        tensors: &[(String, HostTensor)],
        scalars: &serde_json::Value,
    ) -> Result<()> {
        let (opt, _counters) = optimizer_state::unpack(scalars)?;
        self.train.import_optimizer(&self.stream, tensors, opt)
    }

    fn memory_stats(&self) -> Option<MemoryStats> {
        Some(MemoryStats {
            device: self.device_name.clone(),
            peak_bytes: self.peak_used as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(model_type: &str, extra: &str) -> ModelConfig {
        ModelConfig::from_json_str(&format!(
            r#"{{"model_type":"{model_type}","vocab_size":301,"hidden_size":64,"intermediate_size":96,
               "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2{extra}}}"#
        ))
        .unwrap()
    }

    fn opts() -> EngineOptions {
        EngineOptions {
            r: 8,
            lora_alpha: 16.0,
            use_rslora: false,
            lora_dropout: 0.0,
            bias: Bias::None,
            target_modules: PROJECTIONS.iter().map(|s| s.to_string()).collect(),
            init_seed: 1,
            dropout_seed: 1,
            gradient_checkpointing: false,
        }
    }

    #[test]
    fn what_is_not_built_fails_before_touching_a_gpu() {
        assert!(check_supported(&cfg("llama", ""), &opts()).is_ok());
        assert!(check_supported(&cfg("mistral", r#","sliding_window":16"#), &opts()).is_ok());
        for (c, what) in [
            (cfg("qwen2", ""), "projection biases"),
            (cfg("qwen3", ""), "q/k norm"),
        ] {
            let err = check_supported(&c, &opts()).unwrap_err().to_string();
            assert!(err.contains(what) && err.contains("--device cpu"), "{err}");
        }
        let dropout = EngineOptions {
            lora_dropout: 0.1,
            ..opts()
        };
        let err = check_supported(&cfg("llama", ""), &dropout)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--lora_dropout"), "{err}");
    }

    #[test]
    fn lm_head_chunks_bound_the_logits_and_cover_every_row() {
        let c = cfg("llama", "");
        let s = Sizes::new(&c, 2, 2048, 16);
        assert_eq!(s.tokens, 4096);
        assert_eq!(
            s.ce_rows, 4096,
            "301 logits per row: one chunk holds all rows"
        );
        let big = ModelConfig {
            vocab_size: 128_256,
            ..c
        };
        let s = Sizes::new(&big, 2, 2048, 16);
        assert!(
            s.ce_rows * 128_256 <= 64 << 20 && s.ce_rows >= 500,
            "{}",
            s.ce_rows
        );
    }
}
