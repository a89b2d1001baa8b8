//! The cuda backend (feature `cuda`): the whole LoRA training step on one NVIDIA GPU.
//!
//! - Frozen base weights bf16 on the device (straight from the safetensors mmap, [`weights`]);
//!   LoRA A/B and their optimizer state fp32, with bf16 shadows for the GEMMs ([`trainable`]).
//! - Every product through cuBLASLt ([`gemm`]), bf16 operands with fp32 accumulation, LoRA
//!   low-rank first ([`linear`]); frozen weights never get a gradient.
//! - Own kernels (`ferrotune-kernels`, compiled with NVRTC at start and cached on disk) for
//!   RMSNorm, RoPE, SwiGLU, fused flash-style attention, chunked cross-entropy, AdamW, grad norm.
//! - Activations preallocated per batch shape ([`buffers`]); the backward updates one residual
//!   gradient buffer in place; `--use_gradient_checkpointing` recomputes each layer from its
//!   input (`unsloth`: from activations parked in pinned host memory, [`offload`]).
//!
//! The math is the cpu engine's (`engine/cpu`, the reference); `docs/engine.md` has the CUDA
//! section with the data flow and what is not built yet.

mod attention;
mod buffers;
mod extras;
mod gemm;
mod kernel_load;
mod linear;
mod nf4;
mod offload;
mod pinned;
mod pool;
mod raw;
mod reducer;
pub mod replica;
mod stacks;
pub mod staging;
mod swiglu_lora;
mod trainable;
mod weights;

use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::{sys, CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr};
use ferrotune_kernels::cache::KernelCache;
use ferrotune_kernels::device::{bf16, CopyJob, CopyTable, FlashShape, Kernels};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use self::buffers::{Buffers, LayerActs, Sizes};
use self::extras::{Extras, Needs};
use self::gemm::Gemm;
use self::kernel_load::KernelLoad;
use self::linear::{Dropout, DxTerm, Fold, Linear, Lora, Low, LowGrad};
use self::nf4::{Nf4Quantizer, Nf4Weight};
use self::offload::{Group, Layout, Offload, Range};
pub use self::offload::{Parked, Parking};
use self::stacks::{Stack, StackLayout, Stacks};
use self::staging::Staging;
use self::trainable::Trainable;
use self::weights::WeightFiles;
use crate::engine::cpu::dropout::{site_seed, Site};
use crate::engine::cpu::{kaiming_uniform, rope::Rope, trainable_shapes, EngineOptions};
use crate::engine::{optimizer_state, Backend, Batch, HostTensor, MemoryStats, PassStats};
use crate::job::{JobConfig, PROJECTIONS};
use crate::model::ModelConfig;

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
    /// In [`PROJECTIONS`] order, `[out, in]`; a folded projection's bf16 weight is `[out, in +
    /// r]` with its adapter's `B` in the `r` columns ([`Fold`]).
    proj: Vec<ProjWeight>,
    /// Per projection: its bias, if the architecture has one.
    bias: Vec<Option<BiasWeight>>,
    /// Qwen3's per-head q/k RMSNorm weights `[head_dim]`.
    qk_norm: Option<(CudaSlice<bf16>, CudaSlice<bf16>)>,
    /// `(A, B)` slot indices in the trainable arena per projection.
    lora: Vec<Option<(usize, usize)>>,
}

/// A frozen projection weight: bf16, or NF4 (`--load_in_4bit`) dequantised before each use.
enum ProjWeight {
    Bf16(CudaSlice<bf16>),
    Nf4(Nf4Weight),
}

/// A projection bias: frozen (bf16 on the device) or trained (slot in the trainable arena,
/// `--bias all|lora_only`).
enum BiasWeight {
    Frozen(CudaSlice<bf16>),
    Trainable(usize),
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
    /// What `--use_gradient_checkpointing unsloth` parks in pinned host memory (`None`: nothing).
    offload: Option<Parking>,
    frozen_numel: usize,
    /// Device memory free before this backend allocated anything (bytes).
    free_at_start: usize,
    peak_used: usize,
    device_name: String,
    /// Data parallelism: the NCCL gradient sum (see [`reducer`]).
    reducer: Option<reducer::GradReducer>,
    /// Whether the running pass is its window's last on this rank (its backward then hands
    /// finished layers' gradients to the reducer).
    reduce_in_pass: bool,
    /// `--load_in_4bit`: the quantisation maps and the bf16 buffer every NF4 weight is
    /// dequantised into right before a GEMM reads it (sized for the largest projection).
    nf4: Option<(Nf4Quantizer, CudaSlice<bf16>)>,
    /// The LoRA rank when the gate/up adapters' output terms are folded into their frozen
    /// GEMMs ([`Fold`], [`fold_rank`]).
    fold_r: Option<usize>,
    /// The stacked `A`s of the q/k/v and gate/up adapters (with folding on, when every layer
    /// adapts all of a group).
    stacks: Option<Stacks>,
    /// Every copy of the adapters' shadows the folds and stacks read (bf16 weights), run before
    /// each pass; built at the first pass (its addresses never change).
    refresh: Option<CopyTable>,
    /// Dropout scratch, bias-gradient ones, Qwen3 q/k pre-norm activations (per batch shape).
    extras: Option<Extras>,
    /// Training passes so far: with the seed, the LoRA dropout masks' only state (exported with
    /// the optimizer state, as the cpu engine does, so a resumed run draws the same masks).
    passes: u64,
    /// `Some(pass)` while a training pass with LoRA dropout runs.
    dropout_pass: Option<u64>,
}

impl CudaBackend {
    /// Loads the model in `dir` onto GPU 0 for `job`.
    pub fn from_job(dir: &std::path::Path, job: &JobConfig) -> Result<Self> {
        Self::from_job_on(0, dir, job)
    }

    /// [`CudaBackend::from_job`] on GPU `ordinal` (a data-parallel rank).
    pub fn from_job_on(ordinal: usize, dir: &std::path::Path, job: &JobConfig) -> Result<Self> {
        let options = EngineOptions::from_job(job);
        let cfg = ModelConfig::from_dir(dir)?;
        let mut backend = Self::load(
            ordinal,
            dir,
            cfg,
            options,
            job.training.optim,
            job.training.weight_decay,
            job.model.load_in_4bit,
        )?;
        backend.set_parking(Parking::for_checkpointing(
            job.lora.use_gradient_checkpointing,
        )?)?;
        Ok(backend)
    }

    /// `--use_gradient_checkpointing unsloth`: keep each layer's input (and its attention
    /// results, when the host has the memory) in pinned host memory instead of on the GPU
    /// (copies overlap the compute on a side stream).
    pub fn set_parking(&mut self, parking: Option<Parking>) -> Result<()> {
        ensure!(
            parking.is_none() || self.options.gradient_checkpointing,
            "offloading layer inputs needs gradient checkpointing"
        );
        if parking != self.offload {
            self.offload = parking;
            self.bufs = None;
        }
        Ok(())
    }

    /// [`Self::set_parking`] with one mode (still subject to the host's memory).
    pub fn set_offload(&mut self, parked: Option<Parked>) -> Result<()> {
        self.set_parking(parked.map(Parking::Only))
    }

    /// What the current activation buffers park (`None`: no offload or no buffers yet).
    pub fn parked(&self) -> Option<Parked> {
        self.bufs.as_ref()?.offload.as_ref().map(|o| o.parked)
    }

    /// Pinned host bytes the offload holds (`None`: no offload or no buffers yet).
    pub fn pinned_bytes(&self) -> Option<usize> {
        self.bufs
            .as_ref()?
            .offload
            .as_ref()
            .map(Offload::host_bytes)
    }

    pub fn new(
        dir: &std::path::Path,
        cfg: ModelConfig,
        options: EngineOptions,
        optim: crate::cli::choices::Optim,
        weight_decay: f64,
    ) -> Result<Self> {
        Self::load(0, dir, cfg, options, optim, weight_decay, false)
    }

    /// [`CudaBackend::new`] on GPU `ordinal`, with the projection weights NF4-quantised on the
    /// GPU when `load_in_4bit` (QLoRA).
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        ordinal: usize,
        dir: &std::path::Path,
        cfg: ModelConfig,
        options: EngineOptions,
        optim: crate::cli::choices::Optim,
        weight_decay: f64,
        load_in_4bit: bool,
    ) -> Result<Self> {
        check_supported(&cfg, &options)?;
        probe().map_err(|why| anyhow::anyhow!("--device cuda: {why}"))?;
        let ctx = CudaContext::new(ordinal).with_context(|| format!("opening GPU {ordinal}"))?;
        let device_name = device_description(&ctx);
        // One stream orders everything; per-buffer event tracking would only add overhead.
        // SAFETY: no other stream touches these buffers.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let (free_at_start, _) = ctx.mem_get_info()?;
        // The kernels load on their own thread while the weights upload (kernel_load.rs).
        let cache = ferrotune_kernels::cache::default_dir().map(KernelCache::new);
        let mut kernels = KernelLoad::start(&ctx, cache, &device_name);
        let gemm = Gemm::new(stream.clone())?;

        let upload_started = std::time::Instant::now();
        let files = WeightFiles::open(dir)?;
        let mut staging = Staging::new(&stream)?;
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = files.upload(&mut staging, "model.embed_tokens.weight", &[v, h])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(files.upload(&mut staging, "lm_head.weight", &[v, h])?)
        };
        let final_norm = files.upload(&mut staging, "model.norm.weight", &[h])?;

        let shapes = trainable_shapes(&cfg, &options)?;
        let mut rng = ChaCha8Rng::seed_from_u64(options.init_seed);
        let mut init = Vec::with_capacity(shapes.len());
        for (name, shape) in &shapes {
            // The cpu engine's initialisation, drawn in the same order: A kaiming-uniform, B zero,
            // a trainable bias starts from the checkpoint's.
            if name.ends_with("lora_A.weight") {
                init.push(kaiming_uniform(&mut rng, shape[0], shape[1]));
            } else if let Some(module) = name.strip_suffix(".bias") {
                let hf = module
                    .trim_start_matches("base_model.model.")
                    .trim_end_matches(".base_layer");
                init.push(files.read_f32(&format!("{hf}.bias"), shape)?);
            } else {
                init.push(vec![0.0; shape.iter().product()]);
            }
        }
        let train = Trainable::new(&stream, &shapes, &init, optim, weight_decay)?;
        let slot = |name: &str| train.slots.iter().position(|s| s.name == name);

        // A pre-quantised base implies 4-bit, as in Unsloth (its NF4 weights are used as stored).
        if let Some(p) = files.prequantized().filter(|_| ordinal == 0) {
            tracing::info!(
                "{}",
                p.describe(dir, "QLoRA on its NF4 weights (4-bit implied)")
            );
        }
        let mut quantizer = if load_in_4bit || files.prequantized().is_some() {
            Some(Nf4Quantizer::new(&stream)?)
        } else {
            None
        };
        let d = cfg.head_dim;
        let fold_r = fold_rank(&options);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut proj = Vec::with_capacity(7);
            let mut bias = Vec::with_capacity(7);
            let mut lora = Vec::with_capacity(7);
            for name in PROJECTIONS {
                let group = if matches!(name, "q_proj" | "k_proj" | "v_proj" | "o_proj") {
                    "self_attn"
                } else {
                    "mlp"
                };
                let (inp, out) = cfg.projection_shape(name).expect("known projection");
                let hf = format!("{p}.{group}.{name}");
                let peft = format!("base_model.model.{hf}");
                let adapter = slot(&format!("{peft}.lora_A.weight"))
                    .zip(slot(&format!("{peft}.lora_B.weight")));
                let weight = nf4::load_projection(
                    &mut staging,
                    &mut kernels,
                    &files,
                    quantizer.as_mut(),
                    &format!("{hf}.weight"),
                    &[out, inp],
                )?;
                let layout = WeightLayout::of(fold_r, proj.len(), adapter.is_some(), (out, inp));
                proj.push(match weight {
                    ProjWeight::Bf16(w) if layout.padded(out * inp) => {
                        ProjWeight::Bf16(layout.place(&stream, w, (out, inp))?)
                    }
                    w => w,
                });
                bias.push(if cfg.projection_has_bias(name) {
                    match slot(&format!("{peft}.base_layer.bias"))
                        .or_else(|| slot(&format!("{peft}.bias")))
                    {
                        Some(i) => Some(BiasWeight::Trainable(i)),
                        None => Some(BiasWeight::Frozen(files.upload(
                            &mut staging,
                            &format!("{hf}.bias"),
                            &[out],
                        )?)),
                    }
                } else {
                    None
                });
                lora.push(adapter);
            }
            let qk_norm = if cfg.qk_norm {
                Some((
                    files.upload(&mut staging, &format!("{p}.self_attn.q_norm.weight"), &[d])?,
                    files.upload(&mut staging, &format!("{p}.self_attn.k_norm.weight"), &[d])?,
                ))
            } else {
                None
            };
            layers.push(LayerWeights {
                norm1: files.upload(&mut staging, &format!("{p}.input_layernorm.weight"), &[h])?,
                norm2: files.upload(
                    &mut staging,
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[h],
                )?,
                proj,
                bias,
                qk_norm,
                lora,
            });
        }
        // A group is stacked when every layer adapts all of it (folding on: no dropout).
        let present = Stack::ALL.map(|st| {
            fold_r.is_some()
                && layers
                    .iter()
                    .all(|w| st.members().all(|j| w.lora[j].is_some()))
        });
        let stacks = match fold_r {
            Some(r) => {
                let layout = StackLayout::new(r, h, present);
                Stacks::new(&stream, cfg.num_hidden_layers, layout)?
            }
            None => None,
        };
        let nf4 = match quantizer {
            Some(q) => {
                // Folded weights are dequantised with their adapter's columns beside them.
                let largest = PROJECTIONS
                    .iter()
                    .enumerate()
                    .map(|(j, n)| {
                        let (i, o) = cfg.projection_shape(n).expect("known projection");
                        WeightLayout::of(fold_r, j, true, (o, i)).len
                    })
                    .max()
                    .unwrap_or(0);
                Some((q, stream.alloc_zeros::<bf16>(largest)?))
            }
            None => None,
        };
        let trained_biases: usize = train
            .slots
            .iter()
            .filter(|s| s.name.ends_with(".bias"))
            .map(|s| s.numel())
            .sum();
        let inv_freq = stream.clone_htod(Rope::new(&cfg).inv_freq())?;
        let kernels = kernels.into_ready()?;
        stream.synchronize()?;
        tracing::info!(
            "weights on the GPU: {:.1} GiB copied in {:.2} s",
            staging.bytes_copied() as f64 / (1u64 << 30) as f64,
            upload_started.elapsed().as_secs_f64()
        );
        drop(staging);
        let mut backend = CudaBackend {
            frozen_numel: files.numel()? - trained_biases,
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
            offload: None,
            free_at_start,
            peak_used: 0,
            device_name,
            reducer: None,
            reduce_in_pass: false,
            nf4,
            fold_r,
            stacks,
            refresh: None,
            extras: None,
            passes: 0,
            dropout_pass: None,
        };
        backend.sample_memory()?;
        // Peak allocated bytes count from here, as the Python stacks' numbers count from after
        // their model load (load-time staging, e.g. bf16 weights before NF4, is not training).
        pool::reset_high(&backend.ctx)?;
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

    fn dims(&self, batch: usize, seq: usize) -> FlashShape {
        FlashShape {
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
            let previous = self.bufs.take().and_then(|b| b.offload);
            self.extras = None;
            let dims = self.dims(batch.batch_size, batch.seq_len);
            let keep_all = !self.options.gradient_checkpointing;
            self.bufs = Some(Buffers::new(
                &self.stream,
                sizes,
                self.cfg.num_hidden_layers,
                keep_all,
                self.offload.is_some(),
                &dims,
            )?);
            let needs = Needs {
                dropout: self.options.lora_dropout > 0.0,
                bias_grads: self.layers.iter().any(|w| {
                    w.bias
                        .iter()
                        .any(|b| matches!(b, Some(BiasWeight::Trainable(_))))
                }),
                qk_norm: self.cfg.qk_norm,
            };
            let slots = if keep_all {
                self.cfg.num_hidden_layers
            } else {
                1
            };
            let heads = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads);
            self.extras = Some(Extras::new(&self.stream, &sizes, heads, slots, needs)?);
            if let Some(wanted) = self.offload {
                let b = self.bufs.as_ref().expect("just allocated");
                let offload = self.offload_buffers(b, wanted, previous)?;
                self.bufs.as_mut().expect("just allocated").offload = Some(offload);
            }
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

    /// Layer `l`'s seven projections in [`PROJECTIONS`] order: q, k, v, o, gate, up, down.
    fn linears(&self, l: usize, tokens: usize, acts: &LayerActs) -> [Linear; PROJECTIONS.len()] {
        std::array::from_fn(|j| self.linear(l, j, tokens, acts))
    }

    fn linear(&self, l: usize, j: usize, tokens: usize, acts: &LayerActs) -> Linear {
        let (inp, out) = self
            .cfg
            .projection_shape(PROJECTIONS[j])
            .expect("known projection");
        let s = &self.stream;
        let layer = &self.layers[l];
        let (base, nf4) = match (&layer.proj[j], &self.nf4) {
            (ProjWeight::Bf16(w), _) => (w.device_ptr(s).0, None),
            (ProjWeight::Nf4(q), Some((quant, buf))) => {
                (buf.device_ptr(s).0, Some(q.ptrs(s, &quant.maps)))
            }
            (ProjWeight::Nf4(_), None) => unreachable!("NF4 weights are loaded with their buffer"),
        };
        let has_lora = layer.lora[j].is_some();
        let layout = WeightLayout::of(self.fold_r, j, has_lora, (out, inp));
        let (w, w_ld) = (base + (2 * layout.at) as u64, layout.ld);
        // gate and up read the MLP's norm output, which sits between the fold columns; o and
        // down's output gradient is the residual's, with spare columns for the dx folds.
        let x_ld = match j {
            GATE_PROJ | UP_PROJ => self.norm2_layout().1,
            _ => inp,
        };
        let dy_ld = match j {
            O_PROJ | DOWN_PROJ => self.dres_ld(),
            _ => out,
        };
        let fold = fold_of(self.fold_r, j, has_lora);
        let stack = self.stacks.as_ref().and_then(|st| st.layout.of(j));
        let dx_term = match stack {
            _ if dx_folds(self.fold_r, j, has_lora) => DxTerm::Folded,
            // The gate/up input-gradient terms stay per projection (their t's land apart).
            Some(Stack::Qkv) => DxTerm::Stacked,
            _ => DxTerm::Add,
        };
        let r = self.options.r;
        // A stacked group's `low`s sit side by side in the first member's block.
        let (low, low_ld) = match stack {
            Some(st) => {
                let first = st.members().start;
                let at = (2 * (j - first) * r) as u64;
                (acts.low(s, first, tokens, r) + at, st.members().len() * r)
            }
            None => (acts.low(s, j, tokens, r), r),
        };
        let extras = self.extras.as_ref().expect("prepared with the buffers");
        let ptr16 = |x: &CudaSlice<bf16>| x.device_ptr(s).0;
        let bias = layer.bias[j].as_ref().map(|b| match b {
            BiasWeight::Frozen(v) => linear::Bias {
                value: ptr16(v),
                grad: None,
            },
            BiasWeight::Trainable(i) => {
                let (value, grad) = self.train.ptrs(s, *i);
                let ones = extras
                    .ones
                    .as_ref()
                    .expect("allocated for trainable biases");
                linear::Bias {
                    value,
                    grad: Some((grad, ptr16(ones))),
                }
            }
        });
        let dropout = self.dropout_pass.map(|pass| {
            let (threshold, scale) = ferrotune_kernels::reference::dropout::dropout_params(
                self.options.lora_dropout as f32,
            );
            let site = Site {
                pass,
                layer: l,
                module: j,
            };
            Dropout {
                seed: site_seed(self.options.dropout_seed, site),
                threshold,
                scale,
                scratch: ptr16(extras.dropout.as_ref().expect("allocated for dropout")),
            }
        });
        let lora = layer.lora[j].map(|(ia, ib)| {
            let (a, grad_a) = self.train.ptrs(s, ia);
            let (b, grad_b) = self.train.ptrs(s, ib);
            Lora {
                a,
                b,
                grad_a,
                grad_b,
                low,
                low_ld,
                r,
                scale: self.options.lora_scale() as f32,
                dropout,
            }
        });
        Linear {
            n: tokens,
            inp,
            out,
            w,
            w_ld,
            x_ld,
            dy_ld,
            nf4,
            bias,
            lora,
            fold,
            dx_term,
            nf4_ready: false,
        }
    }

    /// Layer `l` forward, first half: from its input to its attention output — RMSNorm, q/k/v
    /// (with Qwen3's q/k norm), RoPE, attention. Activations go to `acts[slot]`.
    fn attention_half(&mut self, b: &mut Buffers, l: usize, slot: usize) -> Result<()> {
        self.qkv(b, l, slot, Low::Compute)?;
        let a = &mut b.acts[slot];
        let dims = self.dims(b.sizes.batch, b.sizes.seq);
        attention::forward(
            &self.stream,
            &self.kernels,
            &dims,
            (&a.q, &a.k, &a.v),
            (&mut a.attn, &mut a.lse),
            &b.segments,
            &mut b.attn,
        )
    }

    /// Layer `l`'s attention operands into `acts[slot]`: RMSNorm (left in `norm`), q/k/v (with
    /// Qwen3's q/k norm) and RoPE. `Low::Ready`: the q/k/v adapters' `low`s are in place (a
    /// recompute with [`Parked::AttentionOutput`], which parks them but not q/k/v).
    fn qkv(&mut self, b: &mut Buffers, l: usize, slot: usize, low: Low) -> Result<()> {
        let s = self.stream.clone();
        let sz = b.sizes;
        let n = sz.tokens;
        let eps = self.cfg.rms_norm_eps as f32;
        let ptr16 = |x: &CudaSlice<bf16>| x.device_ptr(&s).0;
        self.layer_norm(b, l, slot, Norm::Attention)?;
        let a = &mut b.acts[slot];
        let w = &self.layers[l];
        let [q, k, v, ..] = self.linears(l, n, a);
        let (n1, qp, kp, vp) = (ptr16(&b.norm), ptr16(&a.q), ptr16(&a.k), ptr16(&a.v));
        let (nh, nkv, d) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        );
        let kern = &self.kernels;
        // Stacked adapters: all three x·Aᵀ in one GEMM, into their side-by-side `low`s.
        let low = match (low, self.stacks.as_ref().filter(|st| st.has(Stack::Qkv))) {
            (Low::Compute, Some(st)) => {
                let low = q.lora.expect("stacked adapters").low;
                let x = (n1, sz.hidden);
                st.lows(&mut self.gemm, (l, Stack::Qkv), n, x, low, 1.0)?;
                Low::Ready
            }
            (low, _) => low,
        };
        // Qwen3: q/k land pre-norm in the extras, and their per-head RMSNorm writes a.q/a.k.
        let qk = match (&w.qk_norm, self.extras.as_mut()) {
            (Some(norms), Some(e)) => Some((norms, &mut e.qk[slot])),
            _ => None,
        };
        let (qo, ko) = match &qk {
            Some((_, x)) => (ptr16(&x.q_raw), ptr16(&x.k_raw)),
            None => (qp, kp),
        };
        q.forward_from(&mut self.gemm, kern, n1, qo, None, low)?;
        k.forward_from(&mut self.gemm, kern, n1, ko, None, low)?;
        v.forward_from(&mut self.gemm, kern, n1, vp, None, low)?;
        if let Some(((qn, kn), x)) = qk {
            // Rows of head_dim: [N, H·d] is [N·H, d].
            kern.rmsnorm_fwd(
                &s,
                &x.q_raw.slice(..),
                &qn.slice(..),
                (&mut a.q.slice_mut(..), d),
                &mut x.rstd_q.slice_mut(..),
                n * nh,
                d,
                eps,
            )?;
            kern.rmsnorm_fwd(
                &s,
                &x.k_raw.slice(..),
                &kn.slice(..),
                (&mut a.k.slice_mut(..), d),
                &mut x.rstd_k.slice_mut(..),
                n * nkv,
                d,
                eps,
            )?;
        }
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
        Ok(())
    }

    /// Layer `l`'s o_proj plus the residual: `h = x + o_proj(attn)` (in `acts[slot]`).
    fn o_proj(&mut self, b: &mut Buffers, l: usize, slot: usize) -> Result<()> {
        let s = self.stream.clone();
        let ptr16 = |x: &CudaSlice<bf16>| x.device_ptr(&s).0;
        let x = ptr16(&b.xs[b.x_index(l)]);
        let [.., o, _, _, _] = self.linears(l, b.sizes.tokens, &b.acts[slot]);
        let (attn, h) = (ptr16(&b.acts[slot].attn), ptr16(&b.acts[slot].h));
        o.forward(&mut self.gemm, &self.kernels, attn, h, Some(x))
    }

    /// Layer `l` forward, MLP half: from the residual `h` (in `acts[slot]`) on — RMSNorm,
    /// gate/up, SwiGLU and down_proj, as far as `upto` (see [`MlpUpTo`]).
    fn mlp_half(&mut self, b: &mut Buffers, l: usize, slot: usize, upto: MlpUpTo) -> Result<()> {
        let s = self.stream.clone();
        let sz = b.sizes;
        let (n, i) = (sz.tokens, sz.inter);
        let ptr16 = |x: &CudaSlice<bf16>| x.device_ptr(&s).0;
        let y = (upto == MlpUpTo::NextInput).then(|| ptr16(&b.xs[b.x_index(l + 1)]));
        let [.., gate, up, down] = self.linears(l, n, &b.acts[slot]);
        let h = ptr16(&b.acts[slot].h);
        self.layer_norm(b, l, slot, Norm::Mlp)?;
        let (a, norm) = (&b.acts[slot], self.norm2_ptr(b));
        // The parked recompute finds the gate/up adapters' `low`s fetched back; stacked ones
        // are computed in one GEMM (as s·low: the folds read them so).
        let stack = self.stacks.as_ref().filter(|st| st.has(Stack::GateUp));
        let low = match (upto, stack) {
            (MlpUpTo::GateUp, _) => Low::Ready,
            (_, Some(st)) => {
                let low = gate.lora.expect("stacked adapters").low;
                let scale = self.options.lora_scale() as f32;
                let x = (norm, self.norm2_layout().1);
                st.lows(&mut self.gemm, (l, Stack::GateUp), n, x, low, scale)?;
                Low::Ready
            }
            (_, None) => Low::Compute,
        };
        let (g, kr) = (&mut self.gemm, &self.kernels);
        gate.forward_from(g, kr, norm, ptr16(&a.gate), None, low)?;
        up.forward_from(g, kr, norm, ptr16(&a.up), None, low)?;
        if upto == MlpUpTo::GateUp {
            return Ok(());
        }
        self.kernels.swiglu_fwd(
            &s,
            (&a.gate.slice(..), i),
            (&a.up.slice(..), i),
            (&mut b.mlp.slice_mut(..n * i), i),
            n,
            i,
        )?;
        let act = ptr16(&b.mlp);
        match y {
            Some(y) => down.forward(&mut self.gemm, &self.kernels, act, y, Some(h)),
            None => down.forward_low(&mut self.gemm, &self.kernels, act),
        }
    }

    /// Where the MLP's norm output sits in [`Buffers::norm`]: (first column, row stride). With
    /// folded gate/up adapters the rows are `[s·low_gate | x | s·low_up]` ([`Fold`]).
    fn norm2_layout(&self) -> (usize, usize) {
        let h = self.cfg.hidden_size;
        self.fold_r.map_or((0, h), |r| (r, h + 2 * r))
    }

    /// Row stride of [`Buffers::dres`]: with folds, `r` spare columns after the hidden ones
    /// hold `s·t` for the o/down input gradients ([`DxTerm::Folded`]).
    fn dres_ld(&self) -> usize {
        self.cfg.hidden_size + self.fold_r.unwrap_or(0)
    }

    /// Address of the MLP's norm output (the gate/up input) in [`Buffers::norm`].
    fn norm2_ptr(&self, b: &Buffers) -> u64 {
        b.norm.device_ptr(&self.stream).0 + (2 * self.norm2_layout().0) as u64
    }

    /// `norm` ← layer `l`'s first RMSNorm (of its input) or second (of the residual after
    /// attention, `h`, laid out as [`Self::norm2_layout`]), its rstd into `acts[slot]`.
    fn layer_norm(&self, b: &mut Buffers, l: usize, slot: usize, which: Norm) -> Result<()> {
        let sz = b.sizes;
        let (x, a) = (&b.xs[b.x_index(l)], &mut b.acts[slot]);
        let w = &self.layers[l];
        let (input, weight, rstd, (col, ld)) = match which {
            Norm::Attention => (x, &w.norm1, &mut a.rstd1, (0, sz.hidden)),
            Norm::Mlp => (&a.h, &w.norm2, &mut a.rstd2, self.norm2_layout()),
        };
        self.kernels.rmsnorm_fwd(
            &self.stream,
            &input.slice(..),
            &weight.slice(..),
            (&mut b.norm.slice_mut(col..), ld),
            &mut rstd.slice_mut(..),
            sz.tokens,
            sz.hidden,
            self.cfg.rms_norm_eps as f32,
        )?;
        Ok(())
    }

    /// Where [`Self::down_backward`] leaves `d_act`: the second half of `mlp` (the first takes
    /// the SwiGLU output that down's `dA` reads).
    fn d_act_ptr(&self, b: &Buffers) -> u64 {
        b.mlp.device_ptr(&self.stream).0 + (2 * b.sizes.tokens * b.sizes.inter) as u64
    }

    /// The down projection's backward from ∂L/∂xs[l+1] in `dres`: `d_act` (see
    /// [`Self::d_act_ptr`]), its adapter's `t` (returned, for its `dA` once the SwiGLU output is
    /// recomputed) and `dB`. It reads nothing a recompute writes, so with the residual parked it
    /// runs before the recompute ([`Self::mlp_half_backward`]'s `up_ready`).
    fn down_backward(&mut self, b: &mut Buffers, l: usize, slot: usize) -> Result<Option<LowGrad>> {
        let s = self.stream.clone();
        let p16 = |x: &CudaSlice<bf16>| x.device_ptr(&s).0;
        let [.., down] = self.linears(l, b.sizes.tokens, &b.acts[slot]);
        let (d_act, t_acc) = (self.d_act_ptr(b), b.t_acc.device_ptr(&s).0);
        down.backward(
            &mut self.gemm,
            &self.kernels,
            p16(&b.dres),
            Some((d_act, false)),
            (p16(&b.t), self.options.r),
            t_acc,
        )
    }

    /// [`Self::mlp_half`] backward after [`Self::down_backward`] (`t_down`): from `d_act` to the
    /// attention output's gradient in `d_attn` (`dres` then holds ∂L/∂h, the residual's part of
    /// ∂L/∂xs[l]). `norm2_current`: `norm` still holds this layer's second RMSNorm output (its
    /// forward or recompute wrote it last), so the backward does not compute it again.
    /// `up_ready`: the recompute ran after `down_backward`, so an NF4 buffer still holds up's
    /// weight, dequantised last — up's backward goes first and reuses it.
    fn mlp_half_backward(
        &mut self,
        b: &mut Buffers,
        l: usize,
        slot: usize,
        norm2_current: bool,
        t_down: Option<LowGrad>,
        up_ready: bool,
    ) -> Result<()> {
        let s = self.stream.clone();
        let dres_ld = self.dres_ld();
        let sz = b.sizes;
        let (n, hd, i) = (sz.tokens, sz.hidden, sz.inter);
        let p16 = |x: &CudaSlice<bf16>| x.device_ptr(&s).0;
        let a = &mut b.acts[slot];
        let w = &self.layers[l];
        let [.., o, gate, mut up, down] = self.linears(l, n, a);
        up.nf4_ready = up_ready;
        let t = (p16(&b.t), self.options.r);
        let t_acc = b.t_acc.device_ptr(&s).0;

        // SwiGLU backward in place (gate/up become their gradients, act is recomputed for dA of
        // the down projection); fused with the gate/up adapters' t and dB where it applies, which
        // then leaves both t's side by side.
        let fused = swiglu_lora::applies(&gate, &up);
        let (mut act, d_act) = b.mlp.split_at_mut(n * i);
        let fused_t = if fused {
            let tensors = swiglu_lora::MlpTensors {
                d_act: d_act.slice(..n * i),
                gate: a.gate.slice_mut(..),
                up: a.up.slice_mut(..),
                act: act.slice_mut(..),
            };
            // After the `t` of down's backward (`[N, r]` at the start of `b.t`), which its `dA`
            // reads below: `b.t` holds 3·N·r.
            let t_pair = t.0 + (2 * n * self.options.r) as u64;
            let pair = [&gate, &up];
            let k = &self.kernels;
            Some(swiglu_lora::backward(
                &s,
                k,
                pair,
                tensors,
                &mut b.t_acc,
                t_pair,
            )?)
        } else {
            self.kernels.swiglu_bwd(
                &s,
                (&d_act.slice(..n * i), i),
                (&mut a.gate.slice_mut(..), i),
                (&mut a.up.slice_mut(..), i),
                Some((&mut act, i)),
                n,
                i,
            )?;
            None
        };
        // act is the first half of `mlp`.
        down.grad_a(&mut self.gemm, &self.kernels, p16(&b.mlp), t_down)?;
        if !norm2_current {
            // n2 again (each layer's is not kept); rstd2 is rewritten with the same values.
            self.layer_norm(b, l, slot, Norm::Mlp)?;
        }
        let norm = self.norm2_ptr(b);
        let x_ld = self.norm2_layout().1;
        let (a, g, kr) = (&b.acts[slot], &mut self.gemm, &self.kernels);
        // Stacked adapters keep their t's side by side (gate's, then up's) for one dA GEMM.
        let stack = self.stacks.as_mut().filter(|st| st.has(Stack::GateUp));
        let (d_gate, d_up, dn) = (p16(&a.gate), p16(&a.up), p16(&b.dn));
        // Both t's (gate's, up's) when they sit side by side: from the fused kernel, or from
        // the projections' backward into the stack's layout. Otherwise there is one t buffer
        // (and dropout scratch), so each dA runs right after its own backward.
        let pair = match (fused_t, &stack) {
            (Some([t_gate, t_up]), _) => {
                up.backward_input(g, kr, d_up, Some((dn, false)), Some(t_up))?;
                gate.backward_input(g, kr, d_gate, Some((dn, true)), Some(t_gate))?;
                Some([t_gate, t_up])
            }
            (None, Some(st)) => {
                let ld = st.rows(Stack::GateUp);
                let up_at = (t.0 + (2 * self.options.r) as u64, ld);
                let t_up = up.backward(g, kr, d_up, Some((dn, false)), up_at, t_acc)?;
                let t_gate = gate.backward(g, kr, d_gate, Some((dn, true)), (t.0, ld), t_acc)?;
                Some([t_gate, t_up].map(|t| t.expect("stacked adapters")))
            }
            (None, None) => {
                let t_up = up.backward(g, kr, d_up, Some((dn, false)), t, t_acc)?;
                up.grad_a(g, kr, norm, t_up)?;
                let t_gate = gate.backward(g, kr, d_gate, Some((dn, true)), t, t_acc)?;
                gate.grad_a(g, kr, norm, t_gate)?;
                None
            }
        };
        match (pair, stack) {
            (Some([t_gate, _]), Some(st)) => {
                let scale = self.options.lora_scale() as f32;
                let grads = [&gate, &up].map(|lin| lin.lora.expect("stacked adapters").grad_a);
                // gate's t first: the pair's layout is the stack's.
                st.grad_a(
                    g,
                    kr,
                    Stack::GateUp,
                    n,
                    t_gate.ptr,
                    (norm, x_ld),
                    &grads,
                    scale,
                )?;
            }
            (Some([t_gate, t_up]), None) => {
                up.grad_a(g, kr, norm, Some(t_up))?;
                gate.grad_a(g, kr, norm, Some(t_gate))?;
            }
            (None, _) => {}
        }
        self.kernels.rmsnorm_bwd(
            &s,
            &a.h.slice(..),
            &w.norm2.slice(..),
            &a.rstd2.slice(..),
            &b.dn.slice(..),
            (&mut b.dres.slice_mut(..), dres_ld),
            n,
            hd,
            true,
        )?;

        // o_proj: into the attention output's gradient.
        let d_attn = Some((p16(&b.d_attn), false));
        let t_o = o.backward(g, kr, p16(&b.dres), d_attn, t, t_acc)?;
        o.grad_a(g, kr, p16(&a.attn), t_o)?;
        Ok(())
    }

    /// The attention backward of the layer in `acts[slot]`: `d_attn` into dq, dk, dv.
    fn attention_backward(&mut self, b: &mut Buffers, slot: usize) -> Result<()> {
        let sz = b.sizes;
        let a = &b.acts[slot];
        let dims = self.dims(sz.batch, sz.seq);
        attention::backward(
            &self.stream,
            &self.kernels,
            &dims,
            (&a.q, &a.k, &a.v),
            (&a.attn, &a.lse),
            &b.d_attn,
            (&mut b.dq, &mut b.dk, &mut b.dv),
            &b.segments,
            &mut b.attn,
            // Free until the next layer's MLP: the act half of `mlp` is dead from here.
            &mut b.mlp,
        )?;
        Ok(())
    }

    /// [`Self::attention_half`] backward after the attention's: RoPE, Qwen3's q/k norm and the
    /// q/k/v projections into ∂L/∂xs[l] (added to `dres`; layer 0 stops at the adapters: the
    /// embedding is frozen). The layer's backward is [`Self::mlp_half_backward`],
    /// [`Self::attention_backward`], then this. `norm1_current`: `norm` still holds the
    /// layer's first RMSNorm output (a q/k/v recompute left it there).
    fn qkv_backward(
        &mut self,
        b: &mut Buffers,
        l: usize,
        slot: usize,
        norm1_current: bool,
    ) -> Result<()> {
        let s = self.stream.clone();
        let sz = b.sizes;
        let (n, hd) = (sz.tokens, sz.hidden);
        let p16 = |x: &CudaSlice<bf16>| x.device_ptr(&s).0;
        let xi = b.x_index(l);
        let a = &mut b.acts[slot];
        let w = &self.layers[l];
        let [q, k, v, ..] = self.linears(l, n, a);
        let kr = &self.kernels;
        let (t, t_acc) = (p16(&b.t), b.t_acc.device_ptr(&s).0);
        let r = self.options.r;
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
        // Qwen3: through the per-head q/k RMSNorm to the projections' outputs.
        let (dqp, dkp) = match (&w.qk_norm, self.extras.as_mut()) {
            (Some((qn, kn)), Some(e)) => {
                let x = &e.qk[slot];
                let dq_raw = e.dq_raw.as_mut().expect("allocated with qk norm");
                let dk_raw = e.dk_raw.as_mut().expect("allocated with qk norm");
                kr.rmsnorm_bwd(
                    &s,
                    &x.q_raw.slice(..),
                    &qn.slice(..),
                    &x.rstd_q.slice(..),
                    &b.dq.slice(..),
                    (&mut dq_raw.slice_mut(..), d),
                    n * nh,
                    d,
                    false,
                )?;
                kr.rmsnorm_bwd(
                    &s,
                    &x.k_raw.slice(..),
                    &kn.slice(..),
                    &x.rstd_k.slice(..),
                    &b.dk.slice(..),
                    (&mut dk_raw.slice_mut(..), d),
                    n * nkv,
                    d,
                    false,
                )?;
                (p16(&*dq_raw), p16(&*dk_raw))
            }
            _ => (p16(&b.dq), p16(&b.dk)),
        };
        let need_dx = l > 0;
        let dn = p16(&b.dn);
        // n1 again, for the q/k/v adapters' dA.
        if !norm1_current {
            self.layer_norm(b, l, slot, Norm::Attention)?;
        }
        let (a, g, kr) = (&b.acts[slot], &mut self.gemm, &self.kernels);
        // Stacked adapters keep their t's side by side, for one GEMM of their dx terms and
        // one of their dA.
        let norm = p16(&b.norm);
        let stack = self.stacks.as_mut().filter(|st| st.has(Stack::Qkv));
        let t_ld = stack.as_ref().map_or(r, |st| st.rows(Stack::Qkv));
        let projections = [(&q, dqp, false), (&k, dkp, true), (&v, p16(&b.dv), true)];
        for (j, (lin, dy, acc)) in projections.into_iter().enumerate() {
            let t_at = if stack.is_some() {
                t + (2 * j * r) as u64
            } else {
                t
            };
            let dx = need_dx.then_some((dn, acc));
            let t = lin.backward(g, kr, dy, dx, (t_at, t_ld), t_acc)?;
            if stack.is_none() {
                lin.grad_a(g, kr, norm, t)?;
            }
        }
        if let Some(st) = stack {
            let scale = self.options.lora_scale() as f32;
            if need_dx {
                st.dx(g, (l, Stack::Qkv), n, t, dn, scale)?;
            }
            let grads = [&q, &k, &v].map(|lin| lin.lora.expect("stacked adapters").grad_a);
            st.grad_a(g, kr, Stack::Qkv, n, t, (norm, hd), &grads, scale)?;
        }
        if need_dx {
            let x = &b.xs[xi];
            self.kernels.rmsnorm_bwd(
                &s,
                &x.slice(..),
                &w.norm1.slice(..),
                &a.rstd1.slice(..),
                &b.dn.slice(..),
                (&mut b.dres.slice_mut(..), self.dres_ld()),
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
            (&mut b.hn.slice_mut(..), hd),
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
            b.mlp.device_ptr(&s).0, // the logits chunk
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
                &b.mlp.slice(..sz.ce_rows * vocab),
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
                    &mut b.mlp.slice_mut(..sz.ce_rows * vocab),
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
                (&mut b.dres.slice_mut(..), self.dres_ld()),
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
        batch.check(self.cfg.vocab_size)?;
        self.prepare(batch)?;
        let train = loss_scale.is_some();
        self.dropout_pass = (train && self.options.lora_dropout > 0.0).then_some(self.passes);
        let mut bufs = self.bufs.take().expect("prepared");
        let result = self.pass_in(&mut bufs, loss_scale);
        self.bufs = Some(bufs);
        self.dropout_pass = None;
        if train && result.is_ok() {
            self.passes += 1;
        }
        let loss_sum = result?;
        self.sample_memory()?;
        Ok(PassStats {
            loss_sum,
            tokens: batch.trainable_tokens(),
        })
    }

    fn pass_in(&mut self, b: &mut Buffers, loss_scale: Option<f32>) -> Result<f64> {
        let layers = self.cfg.num_hidden_layers;
        // Folded bf16 weights and the stacks take the adapters' current A and B (NF4 weights
        // at each dequantisation), in one launch.
        if self.fold_r.is_some() {
            if self.refresh.is_none() {
                self.refresh = Some(self.refresh_table(b)?);
            }
            let table = self.refresh.as_ref().expect("built above");
            self.kernels.copy_rows_batch(&self.stream, table)?;
        }
        let train = loss_scale.is_some();
        let keep_all = train && !self.options.gradient_checkpointing;
        let parked = b.offload.as_ref().filter(|_| train).map(|o| o.parked);
        let attention_groups = parked.and_then(Parked::attention_groups);
        let attention_parked = attention_groups.is_some();
        let x0 = b.x_index(0);
        self.kernels.embedding_gather(
            &self.stream,
            &b.ids.slice(..),
            &self.embed.slice(..),
            &mut b.xs[x0].slice_mut(..),
            self.cfg.hidden_size,
        )?;
        // Offload: layer l's input goes out right after it is produced; layer l then writes
        // its output over layer l-1's input, which must have reached the host by then. With the
        // attention parked too, its results go out after the layer's attention (the next
        // layer waits for them before its attention overwrites them) and the residual with
        // o_proj's and down's `x·Aᵀ` after the MLP (awaited before the next layer's o_proj).
        // The last layer parks nothing: its backward comes first and finds everything still on
        // the GPU.
        let (mut input_out, mut attention_out, mut residual_out): (
            Option<CudaEvent>,
            Option<CudaEvent>,
            Option<CudaEvent>,
        ) = (None, None, None);
        for l in 0..layers {
            let slot = if keep_all { l } else { 0 };
            let last = l + 1 == layers;
            if parked.is_some() {
                // The previous layer's copies, awaited after this layer's input is sent off.
                let earlier = [input_out.take(), attention_out.take()];
                if !last {
                    input_out = Some(self.park(b, l, &[Group::Input])?);
                }
                for done in earlier.into_iter().flatten() {
                    self.stream.wait(&done)?;
                }
            }
            self.attention_half(b, l, slot)?;
            if let (Some(groups), false) = (&attention_groups, last) {
                attention_out = Some(self.park(b, l, groups)?);
            }
            if let Some(done) = residual_out.take() {
                self.stream.wait(&done)?;
            }
            self.o_proj(b, l, slot)?;
            self.mlp_half(b, l, slot, MlpUpTo::NextInput)?;
            if attention_parked && !last {
                residual_out = Some(self.park(b, l, &[Group::Residual])?);
            }
        }
        let loss = self.head(b, loss_scale)?;
        if train {
            // Offload: each layer's backward fetches the layer below's input as it starts (into
            // the xs buffer it no longer needs); with the attention parked, the residual and
            // the o/down lows after its MLP backward (their last reader), the attention output and
            // operands right after its attention backward (their buffers are dead from there)
            // and the q/k/v lows at its end. Each is awaited right before its first read: the
            // residual by the recompute, which then starts at the second RMSNorm.
            let mut input_in: Option<CudaEvent> = None;
            let (mut residual_in, mut output_in, mut operands_in, mut lows_in) =
                (None, None, None, None);
            for l in (0..layers).rev() {
                if parked.is_some() {
                    if let Some(ready) = input_in.take() {
                        self.stream.wait(&ready)?;
                    }
                    if l > 0 {
                        input_in = Some(self.fetch(b, l - 1, &[Group::Input])?);
                    }
                }
                let slot = if keep_all { l } else { 0 };
                // Checkpointing recomputes each layer before its backward, except the last: the
                // head touches none of its activations, they are still the forward's. With the
                // residual parked (and down's `low` with it), down's backward needs nothing the
                // recompute writes and goes first, so the recompute's last NF4 dequantisation,
                // up's, is still in the buffer for up's backward.
                let recompute = !keep_all && l + 1 < layers;
                let up_ready = recompute && attention_parked;
                let t_down = if up_ready {
                    if let Some(ready) = residual_in.take() {
                        self.stream.wait(&ready)?;
                    }
                    let t_down = self.down_backward(b, l, slot)?;
                    self.mlp_half(b, l, 0, MlpUpTo::GateUp)?;
                    t_down
                } else {
                    if recompute {
                        self.attention_half(b, l, 0)?;
                        self.o_proj(b, l, 0)?;
                        self.mlp_half(b, l, 0, MlpUpTo::DownLow)?;
                    }
                    self.down_backward(b, l, slot)?
                };
                // o_proj's dA reads the attention output at the end of the MLP backward.
                if let Some(ready) = output_in.take() {
                    self.stream.wait(&ready)?;
                }
                // `norm` still holds this layer's second norm output when its recompute ran
                // last, or its forward (the last layer; the head writes `hn`).
                let norm2_current = !keep_all || l + 1 == layers;
                self.mlp_half_backward(b, l, slot, norm2_current, t_down, up_ready)?;
                if attention_parked && l > 0 {
                    residual_in = Some(self.fetch(b, l - 1, &[Group::Residual])?);
                }
                for ready in [operands_in.take(), lows_in.take()].into_iter().flatten() {
                    self.stream.wait(&ready)?;
                }
                // Parked without q/k/v: they are recomputed from the input and the fetched
                // `low`s, leaving n1 in `norm` for the q/k/v backward.
                let qkv_recomputed = up_ready && parked.is_some_and(Parked::recomputes_qkv);
                if qkv_recomputed {
                    self.qkv(b, l, 0, Low::Ready)?;
                }
                self.attention_backward(b, slot)?;
                let below = attention_groups.filter(|_| l > 0);
                if let Some([output, operands, _]) = below {
                    output_in = Some(self.fetch(b, l - 1, &[output])?);
                    operands_in = Some(self.fetch(b, l - 1, &[operands])?);
                }
                self.qkv_backward(b, l, slot, qkv_recomputed)?;
                if let Some([_, _, lows]) = below {
                    lows_in = Some(self.fetch(b, l - 1, &[lows])?);
                }
                if self.reduce_in_pass {
                    if let Some(r) = self.reducer.as_mut() {
                        r.layer_done(l, &self.stream, &mut self.train.grads)?;
                    }
                }
            }
        }
        Ok(loss)
    }

    /// Every copy [`Self::pass_in`] refreshes before a pass: the folds of the bf16 weights
    /// ([`Linear::fold_copies`]) and the stacks.
    fn refresh_table(&self, b: &Buffers) -> Result<CopyTable> {
        let mut jobs = Vec::new();
        for l in 0..self.cfg.num_hidden_layers {
            let linears = self.linears(l, b.sizes.tokens, &b.acts[0]);
            let mut copies: Vec<linear::RowCopy> = linears
                .iter()
                .filter(|lin| lin.nf4.is_none())
                .flat_map(Linear::fold_copies)
                .collect();
            if let Some(st) = &self.stacks {
                let a_of = |j: usize| linears[j].lora.expect("stacked adapters").a;
                copies.extend(st.copies(&self.stream, l, a_of));
            }
            for c in copies {
                jobs.push(CopyJob::new(c.dst, c.src, c.cols, c.rows)?);
            }
        }
        // SAFETY: the jobs address the weight buffers, the trainable shadows and the stacks,
        // which live (unmoved) as long as the backend that owns this table.
        Ok(unsafe { CopyTable::new(&self.stream, &jobs)? })
    }

    /// The device side of a parked group: the activation buffers of slot 0 (offload runs with
    /// checkpointing) and, for [`Group::Input`], layer `l`'s `xs` buffer.
    fn parcels(&self, b: &Buffers, l: usize, g: Group) -> Vec<Range> {
        let s = &self.stream;
        fn whole<T>(s: &CudaStream, x: &CudaSlice<T>) -> Range {
            Range {
                ptr: x.device_ptr(s).0,
                bytes: x.num_bytes(),
            }
        }
        let a = &b.acts[0];
        match g {
            Group::Input => vec![whole(s, &b.xs[b.x_index(l)])],
            Group::Output => vec![whole(s, &a.attn)],
            Group::Residual => {
                let (n, r) = (b.sizes.tokens, b.sizes.rank.max(1));
                let lows = |j: std::ops::Range<usize>| Range {
                    ptr: a.low(s, j.start, n, r),
                    bytes: j.len() * n * r * std::mem::size_of::<bf16>(),
                };
                // o, gate, up, down are consecutive in PROJECTIONS: their lows are one block.
                vec![whole(s, &a.h), lows(O_PROJ..DOWN_PROJ + 1)]
            }
            Group::Operands => vec![
                whole(s, &a.q),
                whole(s, &a.k),
                whole(s, &a.v),
                whole(s, &a.lse),
            ],
            Group::Logsumexp => vec![whole(s, &a.lse)],
            Group::Lows | Group::QkvLows => {
                let (n, r) = (b.sizes.tokens, b.sizes.rank.max(1));
                // q, k, v come first in PROJECTIONS: their lows are one block.
                let mut v = vec![Range {
                    ptr: a.low(s, 0, n, r),
                    bytes: 3 * n * r * std::mem::size_of::<bf16>(),
                }];
                let qk = self.extras.as_ref().and_then(|e| e.qk.first());
                if let (Group::Lows, Some(x)) = (g, qk) {
                    v.extend([
                        whole(s, &x.q_raw),
                        whole(s, &x.k_raw),
                        whole(s, &x.rstd_q),
                        whole(s, &x.rstd_k),
                    ]);
                }
                v
            }
        }
    }

    /// Pinned host buffers for what `wanted` parks, or only the layer inputs when the
    /// attention's results would not fit in the host's memory (logged): `previous`'s when they
    /// are large enough (the batch shape changes with every padded length), else new ones.
    fn offload_buffers(
        &self,
        b: &Buffers,
        parking: Parking,
        previous: Option<Offload>,
    ) -> Result<Offload> {
        let layout = |parked: Parked| {
            let parcels: Vec<(Group, Vec<Range>)> = self.group_parcels(b, 0, parked.groups());
            let named: Vec<(Group, &[Range])> = parcels.iter().map(|(g, r)| (*g, &r[..])).collect();
            Layout::new(&named)
        };
        let layers = self.cfg.num_hidden_layers;
        let need = offload::Need {
            inputs: layout(Parked::Inputs).total(),
            attention: layout(Parked::Attention).total(),
            attention_output: layout(Parked::AttentionOutput).total(),
        };
        let wanted = match parking {
            Parking::Only(parked) => parked,
            Parking::Auto => offload::preferred(need, self.layer_flops(&b.sizes)),
        };
        // Data-parallel ranks share the host's memory: count all of them.
        let ranks = self.reducer.as_ref().map_or(1, |r| r.rank_of().1);
        let plan = offload::plan(
            wanted,
            need,
            ranks * layers,
            previous.as_ref().map(Offload::capacity),
            previous.as_ref().map_or(0, Offload::host_bytes),
            offload::host_available_bytes(),
        );
        let layout = layout(plan.parked);
        let previous = match previous {
            Some(held) if plan.reuse => return Ok(held.relaid(plan.parked, layout)),
            other => other,
        };
        const GIB: f64 = (1u64 << 30) as f64;
        if plan.parked != wanted {
            let instead = match plan.parked {
                Parked::AttentionOutput => {
                    "the attention output without q/k/v (the backward recomputes q/k/v)"
                }
                _ => "the layer inputs only (the backward recomputes the attention)",
            };
            tracing::warn!(
                "offload: parking the attention results too would pin {:.1} GiB (all ranks), \
                 more than half of the host's available memory; parking {instead}",
                (ranks * layers * need.of(wanted)) as f64 / GIB
            );
        }
        // The old buffers go first: their pinned memory is free before the new allocation.
        drop(previous);
        let pinning_started = std::time::Instant::now();
        let offload = Offload::new(&self.ctx, plan.parked, layout, layers)?;
        tracing::info!(
            "offload: {:?} parked in {:.2} GiB of pinned host memory (pinned in {:.2} s)",
            plan.parked,
            offload.host_bytes() as f64 / GIB,
            pinning_started.elapsed().as_secs_f64()
        );
        Ok(offload)
    }

    /// A decoder layer's forward FLOPs at `sz` (the frozen GEMMs and the causal attention;
    /// the adapters and elementwise work are small), and those of its q/k/v projections.
    fn layer_flops(&self, sz: &Sizes) -> offload::LayerFlops {
        let (n, hidden) = (sz.tokens as f64, sz.hidden as f64);
        let qkv = 2.0 * n * hidden * (sz.qd + 2 * sz.kvd) as f64;
        let o_mlp = 2.0 * n * hidden * (sz.qd + 3 * sz.inter) as f64;
        // QKᵀ and PV, 2·T²·d each per head and sequence, half of them masked.
        let attention = 2.0 * (sz.batch * sz.seq * sz.seq * sz.qd) as f64;
        offload::LayerFlops {
            forward: qkv + o_mlp + attention,
            qkv,
        }
    }

    fn park(&self, b: &Buffers, l: usize, groups: &[Group]) -> Result<CudaEvent> {
        let off = b.offload.as_ref().expect("offload buffers");
        off.park(&self.stream, l, &self.group_parcels(b, l, groups))
    }

    fn fetch(&self, b: &Buffers, l: usize, groups: &[Group]) -> Result<CudaEvent> {
        let off = b.offload.as_ref().expect("offload buffers");
        off.fetch(&self.stream, l, &self.group_parcels(b, l, groups))
    }

    fn group_parcels(&self, b: &Buffers, l: usize, groups: &[Group]) -> Vec<(Group, Vec<Range>)> {
        groups.iter().map(|&g| (g, self.parcels(b, l, g))).collect()
    }
}

/// How far [`CudaBackend::mlp_half`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MlpUpTo {
    /// The whole MLP into the next layer's input (the forward).
    NextInput,
    /// A checkpointing recompute: the next layer's input is already stored, so the down
    /// projection computes just its adapter's `low` (its frozen GEMM, a sixth of the layer's
    /// forward FLOPs, is skipped).
    DownLow,
    /// A recompute with the residual and the gate/up/down adapters' `low`s parked
    /// ([`Group::Residual`]): only the gate/up outputs the SwiGLU backward reads (which
    /// recomputes the SwiGLU output itself), their frozen GEMMs without the `x·Aᵀ` ones.
    GateUp,
}

/// A decoder layer's two RMSNorms: before attention and before the MLP.
#[derive(Debug, Clone, Copy)]
enum Norm {
    Attention,
    Mlp,
}

/// Indices in [`PROJECTIONS`]: o_proj and down_proj (their `low`s are parked with the residual;
/// their input gradients fold their adapters), gate and up (their adapters fold into the
/// frozen GEMMs).
const O_PROJ: usize = 3;
const GATE_PROJ: usize = 4;
const UP_PROJ: usize = 5;
const DOWN_PROJ: usize = 6;

/// The LoRA rank when the gate/up adapters fold into their frozen GEMMs ([`Fold`]): their
/// `r` columns must keep 16-byte rows (`r % 8 == 0`) and the input dense for dropout.
fn fold_rank(o: &EngineOptions) -> Option<usize> {
    (o.r > 0 && o.r.is_multiple_of(8) && o.lora_dropout == 0.0).then_some(o.r)
}

/// How projection `j` folds its adapter (`has_lora`) when folding is on (`fold_r`): gate's
/// columns before its input, up's after, so both read one span of `[s·low_gate | x | s·low_up]`.
fn fold_of(fold_r: Option<usize>, j: usize, has_lora: bool) -> Option<Fold> {
    match (fold_r, j, has_lora) {
        (Some(_), GATE_PROJ, true) => Some(Fold::Before),
        (Some(_), UP_PROJ, true) => Some(Fold::After),
        _ => None,
    }
}

/// Whether projection `j`'s adapter (`has_lora`) folds into its input gradient when folding is
/// on (`fold_r`): o and down, whose output gradient is the residual's ([`DxTerm::Folded`]).
fn dx_folds(fold_r: Option<usize>, j: usize, has_lora: bool) -> bool {
    fold_r.is_some() && has_lora && matches!(j, O_PROJ | DOWN_PROJ)
}

/// Where projection `j`'s weight `[out, in]` sits in its device buffer with its folds: `W`
/// starts `at` elements in, its rows `ld` apart, the buffer `len` elements — `r` spare columns
/// on the side of a [`Fold`] (for `B`), `r` spare rows below for a [`dx_folds`] (for `A`). The
/// bf16 weights are stored so; NF4 ones are dequantised into this layout.
struct WeightLayout {
    at: usize,
    ld: usize,
    len: usize,
}

impl WeightLayout {
    fn of(fold_r: Option<usize>, j: usize, has_lora: bool, (out, inp): (usize, usize)) -> Self {
        let r = fold_r.unwrap_or(0);
        let (at, ld, len) = match fold_of(fold_r, j, has_lora) {
            Some(Fold::Before) => (r, inp + r, out * (inp + r)),
            Some(Fold::After) => (0, inp + r, out * (inp + r)),
            None if dx_folds(fold_r, j, has_lora) => (0, inp, (out + r) * inp),
            None => (0, inp, out * inp),
        };
        WeightLayout { at, ld, len }
    }

    /// Whether the buffer is larger than the weight's `numel` values.
    fn padded(&self, numel: usize) -> bool {
        self.len > numel
    }

    /// A bf16 weight `[out, in]` moved into a buffer of this layout (the spare columns/rows take
    /// the adapter's B/A before each pass).
    fn place(
        &self,
        stream: &Arc<CudaStream>,
        w: CudaSlice<bf16>,
        (out, inp): (usize, usize),
    ) -> Result<CudaSlice<bf16>> {
        let mut buf = stream.alloc_zeros::<bf16>(self.len)?;
        if self.ld == inp {
            // Spare rows only: W is the buffer's dense head.
            stream.memcpy_dtod(&w, &mut buf.slice_mut(..out * inp))?;
            stream.synchronize()?;
            return Ok(buf);
        }
        // A strided copy by the copy engine, not a kernel: the weights upload while the kernels
        // are still compiling (kernel_load.rs).
        let row_bytes = 2 * inp;
        let copy = sys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            srcHost: std::ptr::null(),
            srcDevice: w.device_ptr(stream).0,
            srcArray: std::ptr::null_mut(),
            srcPitch: row_bytes,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            dstHost: std::ptr::null_mut(),
            dstDevice: buf.device_ptr(stream).0 + (2 * self.at) as u64,
            dstArray: std::ptr::null_mut(),
            dstPitch: 2 * self.ld,
            WidthInBytes: row_bytes,
            Height: out,
        };
        // SAFETY: `out` rows of `inp` values from `w` into rows `ld` apart starting `at` in, all
        // inside `buf` (`len` covers them); both live until the stream is synchronised below.
        unsafe { sys::cuMemcpy2DAsync_v2(&copy, stream.cu_stream()) }.result()?;
        stream.synchronize()?;
        Ok(buf)
    }
}

impl CudaBackend {
    /// Joins a data-parallel group as `rank` of `world` (every rank calls this with the same
    /// NCCL `id`; it blocks until all have).
    pub fn connect(&mut self, rank: usize, world: usize, id: cudarc::nccl::safe::Id) -> Result<()> {
        let buckets = reducer::Buckets::new(
            &self.train.slots,
            self.cfg.num_hidden_layers,
            self.train.len,
        );
        self.reducer = Some(reducer::GradReducer::connect(
            &self.stream,
            rank,
            world,
            id,
            buckets,
        )?);
        Ok(())
    }

    /// This rank's share of a window of `window_len` micro-batches, then the gradient sum over
    /// all ranks: the last micro-batch's backward hands each finished bucket to NCCL while it
    /// goes on. Each micro-batch draws the dropout masks of its index in the whole window (what
    /// one GPU accumulating the window would draw), so ranks never share masks.
    pub fn shard_pass(
        &mut self,
        batches: &[Batch],
        window_len: usize,
        loss_scale: f32,
    ) -> Result<PassStats> {
        let Some((rank, world)) = self.reducer.as_ref().map(|r| r.rank_of()) else {
            bail!("shard_pass needs connect first");
        };
        let first_pass = self.passes;
        let mut total = PassStats::default();
        for (i, batch) in batches.iter().enumerate() {
            self.passes = first_pass + (rank + i * world) as u64;
            self.reduce_in_pass = i + 1 == batches.len();
            let pass = self.pass(batch, Some(loss_scale));
            self.reduce_in_pass = false;
            let pass = pass?;
            total.loss_sum += pass.loss_sum;
            total.tokens += pass.tokens;
        }
        self.passes = first_pass + window_len as u64;
        let r = self.reducer.as_mut().expect("checked above");
        if batches.is_empty() {
            r.reduce_all(&self.stream, &mut self.train.grads)?;
        } else {
            r.pass_done(&self.stream, &mut self.train.grads)?;
        }
        Ok(total)
    }
}

/// "NVIDIA H200 (sm_90)" for the GPU behind `ctx`.
fn device_description(ctx: &CudaContext) -> String {
    let name = ctx
        .name()
        .unwrap_or_else(|_| format!("GPU {}", ctx.ordinal()));
    match ctx.compute_capability() {
        Ok((major, minor)) => format!("{name} (sm_{major}{minor})"),
        Err(_) => name,
    }
}

/// What this version of the cuda engine computes; the rest fails here, loudly, before loading.
fn check_supported(cfg: &ModelConfig, o: &EngineOptions) -> Result<()> {
    ensure!(
        (0.0..1.0).contains(&o.lora_dropout),
        "--lora_dropout must be in [0, 1)"
    );
    for m in &o.target_modules {
        ensure!(
            PROJECTIONS.contains(&m.as_str()),
            "--target_modules: {m:?} is not one of {}",
            PROJECTIONS.join(", ")
        );
    }
    ensure!(o.r > 0, "--r must be positive");
    let h = cfg.hidden_size;
    ensure!(
        h.is_multiple_of(8)
            && cfg.intermediate_size.is_multiple_of(8)
            && cfg.head_dim.is_multiple_of(8),
        "the cuda engine needs hidden_size, intermediate_size and head_dim to be multiples of 8"
    );
    attention::check_supported(cfg.head_dim)?;
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
        // The engine-neutral format: the state moves between engines.
        let counters = optimizer_state::EngineCounters {
            forward_passes: Some(self.passes),
        };
        Ok((tensors, optimizer_state::pack(scalars, counters)))
    }

    fn import_optimizer(
        &mut self,
        tensors: &[(String, HostTensor)],
        scalars: &serde_json::Value,
    ) -> Result<()> {
        let (opt, counters) = optimizer_state::unpack(scalars)?;
        self.train.import_optimizer(&self.stream, tensors, opt)?;
        // Absent in checkpoints of cuda builds before LoRA dropout (they ran without it).
        self.passes = optimizer_state::resumed_passes(counters, self.options.lora_dropout);
        Ok(())
    }

    fn memory_stats(&self) -> Option<MemoryStats> {
        Some(MemoryStats {
            device: self.device_name.clone(),
            peak_bytes: self.peak_used as u64,
            // Unknown only if the driver refuses the query; the report then omits it.
            peak_allocated_bytes: pool::used_high(&self.ctx).ok(),
            nf4_base: self.nf4.is_some(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::choices::Bias;

    #[test]
    fn projection_indices_name_their_projections() {
        assert_eq!(PROJECTIONS[O_PROJ], "o_proj");
        assert_eq!(PROJECTIONS[GATE_PROJ], "gate_proj");
        assert_eq!(PROJECTIONS[UP_PROJ], "up_proj");
        assert_eq!(PROJECTIONS[DOWN_PROJ], "down_proj");
    }

    #[test]
    fn folded_weights_are_laid_out_with_their_spare_columns_or_rows() {
        let (r, shape) = (Some(16), (100, 64));
        let at_ld_len = |j| {
            let l = WeightLayout::of(r, j, true, shape);
            (l.at, l.ld, l.len)
        };
        assert_eq!(at_ld_len(GATE_PROJ), (16, 80, 100 * 80));
        assert_eq!(at_ld_len(UP_PROJ), (0, 80, 100 * 80));
        assert_eq!(at_ld_len(DOWN_PROJ), (0, 64, 116 * 64));
        assert_eq!(at_ld_len(0), (0, 64, 100 * 64));
        let plain = WeightLayout::of(None, GATE_PROJ, true, shape);
        assert_eq!((plain.at, plain.ld, plain.len), (0, 64, 100 * 64));
        assert!(!plain.padded(100 * 64) && WeightLayout::of(r, O_PROJ, true, shape).padded(6400));
    }

    #[test]
    fn gate_and_up_fold_on_either_side_of_their_input_only_with_an_aligned_rank_and_no_dropout() {
        let mut o = opts();
        o.r = 16;
        assert_eq!(fold_rank(&o), Some(16));
        assert_eq!(fold_of(Some(16), GATE_PROJ, true), Some(Fold::Before));
        assert_eq!(fold_of(Some(16), UP_PROJ, true), Some(Fold::After));
        assert_eq!(fold_of(Some(16), UP_PROJ, false), None);
        assert_eq!(fold_of(Some(16), O_PROJ, true), None);
        assert_eq!(fold_of(None, GATE_PROJ, true), None);
        assert!(dx_folds(Some(16), O_PROJ, true) && dx_folds(Some(16), DOWN_PROJ, true));
        assert!(!dx_folds(Some(16), DOWN_PROJ, false) && !dx_folds(None, O_PROJ, true));
        assert!(!dx_folds(Some(16), GATE_PROJ, true));
        o.r = 12;
        assert_eq!(fold_rank(&o), None);
        o.r = 16;
        o.lora_dropout = 0.05;
        assert_eq!(fold_rank(&o), None);
    }

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
    fn every_architecture_and_option_is_accepted_and_bad_values_fail_before_touching_a_gpu() {
        let dropout = EngineOptions {
            lora_dropout: 0.1,
            bias: Bias::All,
            ..opts()
        };
        for c in [
            cfg("llama", ""),
            cfg("mistral", r#","sliding_window":16"#),
            cfg("qwen2", ""),
            cfg("qwen3", r#","head_dim":16"#),
            cfg("llama", r#","attention_bias":true,"mlp_bias":true"#),
        ] {
            check_supported(&c, &opts()).unwrap();
            check_supported(&c, &dropout).unwrap();
        }
        for (bad, what) in [
            (
                EngineOptions {
                    lora_dropout: 1.0,
                    ..opts()
                },
                "--lora_dropout",
            ),
            (
                EngineOptions {
                    target_modules: vec!["lm_head".into()],
                    ..opts()
                },
                "--target_modules",
            ),
            (EngineOptions { r: 0, ..opts() }, "--r"),
        ] {
            let err = check_supported(&cfg("llama", ""), &bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains(what), "{err}");
        }
        let odd = cfg("llama", r#","head_dim":12"#);
        assert!(check_supported(&odd, &opts()).is_err());
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
        assert_eq!(
            s.ce_rows, 512,
            "64 Mi logits: 523 rows, down to the 128-row tile"
        );
        let huge = ModelConfig {
            vocab_size: 1 << 20,
            ..big
        };
        assert_eq!(
            Sizes::new(&huge, 2, 2048, 16).ce_rows,
            64,
            "fewer than 128: as many as fit"
        );
    }
}
