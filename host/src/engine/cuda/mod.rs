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
//! One step, by module: [`step`] runs the layer schedule (recompute, park, fetch) over
//! [`forward`]'s two halves of each layer, [`head`] and [`backward`]; [`projections`] gives
//! each GEMM call its [`linear::Linear`] view of a projection; [`parking`] is the offload's
//! device side; [`load`] puts the model on the GPU.
//!
//! The math is the cpu engine's (`engine/cpu`, the reference); `docs/engine.md` has the CUDA
//! section with the data flow and what is not built yet.

mod attention;
mod backward;
mod buffers;
mod extras;
mod forward;
mod gemm;
mod head;
mod kernel_load;
mod linear;
mod load;
mod nf4;
mod offload;
mod oom;
mod parking;
mod pinned;
mod pool;
mod projections;
mod raw;
mod reducer;
pub mod replica;
mod stacks;
pub mod staging;
mod step;
mod swiglu_lora;
mod trainable;
mod weights;

use std::sync::Arc;

use anyhow::{bail, ensure, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use ferrotune_kernels::device::{bf16, CopyTable, FlashShape, Kernels};

use self::buffers::Buffers;
use self::extras::Extras;
use self::gemm::Gemm;
use self::nf4::{Nf4Quantizer, Nf4Weight};
use self::offload::Offload;
pub use self::offload::{Parked, Parking};
use self::stacks::Stacks;
use self::trainable::Trainable;
use crate::engine::cpu::EngineOptions;
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
    /// r]` with its adapter's `B` in the `r` columns ([`Fold`](linear::Fold)).
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
    /// GEMMs ([`Fold`](linear::Fold), [`fold_rank`](projections::fold_rank)).
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
        let cfg = ModelConfig::from_dir(dir)?.for_max_seq_length(job.model.max_seq_length);
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
    use super::buffers::Sizes;
    use super::*;
    use crate::cli::choices::Bias;

    fn cfg(model_type: &str, extra: &str) -> ModelConfig {
        ModelConfig::from_json_str(&format!(
            r#"{{"model_type":"{model_type}","vocab_size":301,"hidden_size":64,"intermediate_size":96,
               "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2{extra}}}"#
        ))
        .unwrap()
    }

    /// Engine options every test starts from (r 8, all projections, no dropout).
    pub(super) fn opts() -> EngineOptions {
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
