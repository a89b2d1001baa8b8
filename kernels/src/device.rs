//! Loading the kernels onto a GPU and launching them.
//!
//! [`Kernels::load`] compiles (or fetches from the disk cache) every module for the context's
//! device and resolves every entry point once; each launch method then checks the arguments
//! against the kernel's layout contract (lengths, divisibility, 16-byte alignment) and enqueues
//! one kernel on the given stream. Buffers are the caller's: nothing here allocates per launch,
//! so the backend can preallocate activations and workspaces once per (batch, seq, model).

use std::sync::Arc;

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, LaunchArgs,
    LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

pub use half::bf16;

use crate::arch::GpuArch;
use crate::cache::KernelCache;
use crate::ptxas::{self, FunctionResources};
use crate::quant::{signed_map, unsigned_map, NF4_BLOCK, Q8_BLOCK};
use crate::reference::adamw::{AdamMode, AdamStep};
use crate::sources::{self, compile_options, KernelSource};
use crate::{nvrtc, KernelError};

mod flash;
mod lora_grads;
pub use flash::{
    FlashBwdKernel, FlashBwdWork, FlashShape, FLASH_BLOCK, FLASH_BWD_ENV, FLASH_MAX_HEAD_DIM,
};
pub use lora_grads::{LoraAdapter, LORA_GRAD_RANKS};

/// Threads per block of the row kernels and elementwise kernels.
const THREADS: u32 = 256;
/// 16-byte vectors each RMSNorm thread keeps in registers (RMS_VECS in rmsnorm.cu).
const RMS_VECS: usize = 4;
/// Upper bound on partial sums of one reduction (the size of the partials buffer it needs).
pub const REDUCE_PARTS: usize = 1024;

/// What [`Kernels::load`] did, for the host's log.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub target: String,
    pub compiler: String,
    /// Modules read from the disk cache.
    pub cached: Vec<&'static str>,
    /// Modules compiled now, with ptxas's report of their functions.
    pub compiled: Vec<(&'static str, Vec<FunctionResources>)>,
    /// Cache writes that failed (the kernels still work; the next start compiles again).
    pub cache_errors: Vec<String>,
    /// Modules whose text came from `$FERROTUNE_KERNEL_SOURCE_DIR` instead of the binary.
    pub overridden: Vec<&'static str>,
    /// Seconds spent compiling or reading the cubins (all modules, in parallel).
    pub cubins_s: f64,
    /// Seconds spent loading them into the context (0 for [`precompile`]).
    pub modules_s: f64,
}

impl LoadReport {
    /// Notes where module `src`'s cubin came from; returns the cubin.
    fn record(
        &mut self,
        src: &'static KernelSource,
        (cubin, origin): (Vec<u8>, Origin),
    ) -> Vec<u8> {
        if src.is_overridden() {
            self.overridden.push(src.name);
        }
        match origin {
            Origin::Cached => self.cached.push(src.name),
            Origin::Compiled { log, cache_error } => {
                self.compiled.push((src.name, ptxas::parse(&log)));
                self.cache_errors.extend(cache_error);
            }
        }
        cubin
    }
}

/// Compiles every module for `arch` into `cache` ahead of time (those already there are kept):
/// no GPU needed, only libnvrtc. A container image built with a filled cache compiles nothing
/// when it starts on a fresh machine (`ferrotune kernels`).
pub fn precompile(arch: GpuArch, cache: &KernelCache) -> Result<LoadReport, KernelError> {
    let (mut report, cubins) = cubins_reported(arch, Some(cache))?;
    for (src, cubin) in sources::ALL.iter().zip(cubins) {
        report.record(src, cubin?);
    }
    Ok(report)
}

/// Each module's cubin and where it came from, in [`sources::ALL`]'s order.
type Cubins = Vec<Result<(Vec<u8>, Origin), KernelError>>;

/// [`all_cubins`] timed, with a report naming the target and the compiler (filled in by
/// [`LoadReport::record`]); an architecture older than the kernels support is refused.
fn cubins_reported(
    arch: GpuArch,
    cache: Option<&KernelCache>,
) -> Result<(LoadReport, Cubins), KernelError> {
    if !arch.is_supported() {
        return Err(KernelError::UnsupportedArch(arch));
    }
    let compiler = nvrtc::compiler_id()?;
    let started = std::time::Instant::now();
    let cubins = all_cubins(arch, &compiler, cache);
    let report = LoadReport {
        target: arch.nvrtc_target(),
        compiler,
        cubins_s: started.elapsed().as_secs_f64(),
        ..Default::default()
    };
    Ok((report, cubins))
}

/// Every module's cubin for `arch`, from `cache` or compiled. One thread per module (NVRTC
/// compiles distinct programs concurrently): a cold start waits for the slowest module, not for
/// the sum of them.
fn all_cubins(arch: GpuArch, compiler: &str, cache: Option<&KernelCache>) -> Cubins {
    std::thread::scope(|s| {
        let jobs: Vec<_> = sources::ALL
            .iter()
            .map(|src| s.spawn(move || module_cubin(src, arch, compiler, cache)))
            .collect();
        jobs.into_iter()
            .map(|job| job.join().expect("a kernel compile thread panicked"))
            .collect()
    })
}

struct Functions {
    rmsnorm_fwd: CudaFunction,
    rmsnorm_bwd: CudaFunction,
    rope_cos_sin: CudaFunction,
    rope_apply: CudaFunction,
    swiglu_fwd: CudaFunction,
    swiglu_bwd: CudaFunction,
    ce_stats: CudaFunction,
    ce_grad: CudaFunction,
    adamw_fp32: CudaFunction,
    adamw_8bit: CudaFunction,
    reduce_partial: CudaFunction,
    reduce_final: CudaFunction,
    grad_norm_final: CudaFunction,
    add_blocks_f32: CudaFunction,
    nf4_quantize: CudaFunction,
    nf4_dequantize: CudaFunction,
    nf4_dequantize_dq: CudaFunction,
    quantize_blockwise_8bit: CudaFunction,
    embedding_gather: CudaFunction,
    copy_rows: CudaFunction,
    copy_rows_batch: CudaFunction,
    dropout_apply: CudaFunction,
    flash: flash::FlashFunctions,
    lora_grads: lora_grads::LoraGradFunctions,
}

/// Every kernel, loaded for one device.
pub struct Kernels {
    ctx: Arc<CudaContext>,
    arch: GpuArch,
    sm_count: u32,
    f: Functions,
}

/// Per-row workspace of the chunked cross-entropy ([`Kernels::ce_stats`]), sized for the
/// largest row count once.
pub struct CrossEntropyRows {
    pub run_max: CudaSlice<f32>,
    pub run_sum: CudaSlice<f32>,
    pub target_logit: CudaSlice<f32>,
    /// logsumexp per row, written by the last chunk's ce_stats.
    pub lse: CudaSlice<f32>,
    /// Loss per row (0 where ignored), written by the last chunk's ce_stats.
    pub loss: CudaSlice<f32>,
}

impl CrossEntropyRows {
    pub fn new(stream: &Arc<CudaStream>, rows: usize) -> Result<Self, KernelError> {
        Ok(Self {
            run_max: stream.alloc_zeros(rows)?,
            run_sum: stream.alloc_zeros(rows)?,
            target_logit: stream.alloc_zeros(rows)?,
            lse: stream.alloc_zeros(rows)?,
            loss: stream.alloc_zeros(rows)?,
        })
    }

    fn rows(&self) -> usize {
        self.lse.len()
    }
}

/// The dynamic quantisation maps on the device (8-bit Adam states, double-quantised absmax).
pub struct QuantMaps {
    pub signed: CudaSlice<f32>,
    pub unsigned: CudaSlice<f32>,
}

impl QuantMaps {
    pub fn upload(stream: &Arc<CudaStream>) -> Result<Self, KernelError> {
        Ok(Self {
            signed: stream.clone_htod(signed_map().as_slice())?,
            unsigned: stream.clone_htod(unsigned_map().as_slice())?,
        })
    }
}

/// 8-bit blockwise Adam states of a flat parameter arena (bitsandbytes layout).
pub struct Adam8bitStates<'a> {
    pub m_codes: CudaViewMut<'a, u8>,
    pub m_absmax: CudaViewMut<'a, f32>,
    pub v_codes: CudaViewMut<'a, u8>,
    pub v_absmax: CudaViewMut<'a, f32>,
}

/// Double-quantised NF4 statistics (bitsandbytes `compress_statistics=True`).
pub struct Nf4DoubleQuant<'a> {
    /// One byte per 64-value block.
    pub qabsmax: CudaView<'a, u8>,
    /// One fp32 per 256 blocks.
    pub absmax2: CudaView<'a, f32>,
    /// Device scalar: the mean that was subtracted before quantising.
    pub offset: CudaView<'a, f32>,
}

static NULL_PTR: u64 = 0;

fn shape(kernel: &'static str, msg: impl Into<String>) -> KernelError {
    KernelError::Shape {
        kernel,
        msg: msg.into(),
    }
}

fn check_len(kernel: &'static str, what: &str, got: usize, want: usize) -> Result<(), KernelError> {
    if got < want {
        return Err(shape(
            kernel,
            format!("{what} holds {got} elements, needs {want}"),
        ));
    }
    Ok(())
}

/// Elements that `rows` rows of `width` values, `ld` apart, span (0 for no rows).
fn strided_len(rows: usize, ld: usize, width: usize) -> usize {
    if rows == 0 {
        0
    } else {
        (rows - 1) * ld + width
    }
}

fn to_i32(kernel: &'static str, what: &str, v: usize) -> Result<i32, KernelError> {
    i32::try_from(v).map_err(|_| shape(kernel, format!("{what} = {v} exceeds i32")))
}

fn aligned16<T, P: DevicePtr<T>>(
    kernel: &'static str,
    what: &str,
    buf: &P,
    stream: &CudaStream,
) -> Result<(), KernelError> {
    aligned(kernel, what, buf, stream, 16)
}

/// `buf` starts on a `bytes` boundary (the widest access a kernel makes to it).
fn aligned<T, P: DevicePtr<T>>(
    kernel: &'static str,
    what: &str,
    buf: &P,
    stream: &CudaStream,
    bytes: u64,
) -> Result<(), KernelError> {
    let (ptr, _sync) = buf.device_ptr(stream);
    if !ptr.is_multiple_of(bytes) {
        return Err(shape(
            kernel,
            format!("{what} must start on a {bytes}-byte boundary"),
        ));
    }
    Ok(())
}

fn grid(n: usize, per_block: usize, cap: u32) -> u32 {
    (n.div_ceil(per_block).max(1) as u64).min(cap as u64) as u32
}

fn cfg(grid: u32, block: (u32, u32)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (block.0, block.1, 1),
        shared_mem_bytes: 0,
    }
}

fn launch(mut args: LaunchArgs<'_>, config: LaunchConfig) -> Result<(), KernelError> {
    // SAFETY: every launcher pushes exactly the kernel's parameters, in order, with the C types
    // of its signature, after checking the buffers against the kernel's layout contract.
    unsafe { args.launch(config) }?;
    Ok(())
}

impl Kernels {
    /// Compiles or loads from `cache` every module for the device of `ctx`.
    pub fn load(
        ctx: &Arc<CudaContext>,
        cache: Option<&KernelCache>,
    ) -> Result<(Self, LoadReport), KernelError> {
        let (major, minor) = ctx.compute_capability()?;
        let arch = GpuArch::new(major as u32, minor as u32);
        let sm_count =
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let smem_optin = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
            as usize;
        let (mut report, cubins) = cubins_reported(arch, cache)?;
        let started = std::time::Instant::now();
        let mut modules = Vec::with_capacity(sources::ALL.len());
        for (src, cubin) in sources::ALL.iter().zip(cubins) {
            let cubin = report.record(src, cubin?);
            modules.push(ctx.load_module(Ptx::from_binary(cubin))?);
        }
        report.modules_s = started.elapsed().as_secs_f64();
        let get = |src: &KernelSource, name: &str| -> Result<CudaFunction, KernelError> {
            let i = sources::ALL
                .iter()
                .position(|s| s.name == src.name)
                .expect("module is registered");
            Ok(modules[i].load_function(name)?)
        };
        use sources::*;
        let f = Functions {
            rmsnorm_fwd: get(&RMSNORM, "rmsnorm_fwd")?,
            rmsnorm_bwd: get(&RMSNORM, "rmsnorm_bwd")?,
            rope_cos_sin: get(&ROPE, "rope_cos_sin")?,
            rope_apply: get(&ROPE, "rope_apply")?,
            swiglu_fwd: get(&SWIGLU, "swiglu_fwd")?,
            swiglu_bwd: get(&SWIGLU, "swiglu_bwd")?,
            ce_stats: get(&CROSS_ENTROPY, "ce_stats")?,
            ce_grad: get(&CROSS_ENTROPY, "ce_grad")?,
            adamw_fp32: get(&ADAMW, "adamw_fp32")?,
            adamw_8bit: get(&ADAMW, "adamw_8bit")?,
            reduce_partial: get(&REDUCE, "reduce_partial")?,
            reduce_final: get(&REDUCE, "reduce_final")?,
            grad_norm_final: get(&REDUCE, "grad_norm_final")?,
            add_blocks_f32: get(&REDUCE, "add_blocks_f32")?,
            nf4_quantize: get(&NF4, "nf4_quantize")?,
            nf4_dequantize: get(&NF4, "nf4_dequantize")?,
            nf4_dequantize_dq: get(&NF4, "nf4_dequantize_dq")?,
            quantize_blockwise_8bit: get(&NF4, "quantize_blockwise_8bit")?,
            embedding_gather: get(&EMBEDDING, "embedding_gather")?,
            copy_rows: get(&EMBEDDING, "copy_rows")?,
            copy_rows_batch: get(&EMBEDDING, "copy_rows_batch")?,
            dropout_apply: get(&DROPOUT, "dropout_apply")?,
            flash: flash::FlashFunctions::load(|name| get(&ATTENTION, name), smem_optin, arch)?,
            lora_grads: lora_grads::LoraGradFunctions::load(|name| get(&SWIGLU, name))?,
        };
        Ok((
            Self {
                ctx: ctx.clone(),
                arch,
                sm_count,
                f,
            },
            report,
        ))
    }

    pub fn arch(&self) -> GpuArch {
        self.arch
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Grid cap for grid-stride kernels: enough blocks to fill every SM several times over.
    fn stride_cap(&self) -> u32 {
        self.sm_count.max(1) * 16
    }

    /// RMSNorm forward: y = x * rstd * w over rows of `dim`, into rows of `y` that are `y.1`
    /// (≥ dim, a multiple of 8) elements apart; rstd [rows] saved for backward.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_fwd(
        &self,
        stream: &CudaStream,
        x: &CudaView<bf16>,
        w: &CudaView<bf16>,
        (y, y_ld): (&mut CudaViewMut<bf16>, usize),
        rstd: &mut CudaViewMut<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(), KernelError> {
        const K: &str = "rmsnorm_fwd";
        if rows == 0 {
            return Ok(());
        }
        let (threads, rows_i, dim_i, ld_i) =
            rms_rows(K, rows, dim, ("y", y.len(), y_ld), (w.len(), rstd.len()))?;
        check_len(K, "x", x.len(), rows * dim)?;
        aligned16(K, "x", x, stream)?;
        aligned16(K, "w", w, stream)?;
        aligned16(K, "y", y, stream)?;
        let mut a = stream.launch_builder(&self.f.rmsnorm_fwd);
        a.arg(x)
            .arg(w)
            .arg(y)
            .arg(rstd)
            .arg(&rows_i)
            .arg(&dim_i)
            .arg(&ld_i)
            .arg(&eps);
        launch(a, cfg(rows as u32, (threads, 1)))
    }

    /// RMSNorm input gradient into rows of `dx` that are `dx.1` (≥ dim, a multiple of 8)
    /// elements apart. With `accumulate`, dx += result (the residual's gradient).
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_bwd(
        &self,
        stream: &CudaStream,
        x: &CudaView<bf16>,
        w: &CudaView<bf16>,
        rstd: &CudaView<f32>,
        dy: &CudaView<bf16>,
        (dx, dx_ld): (&mut CudaViewMut<bf16>, usize),
        rows: usize,
        dim: usize,
        accumulate: bool,
    ) -> Result<(), KernelError> {
        const K: &str = "rmsnorm_bwd";
        if rows == 0 {
            return Ok(());
        }
        let (threads, rows_i, dim_i, ld_i) =
            rms_rows(K, rows, dim, ("dx", dx.len(), dx_ld), (w.len(), rstd.len()))?;
        for (what, len) in [("x", x.len()), ("dy", dy.len())] {
            check_len(K, what, len, rows * dim)?;
        }
        aligned16(K, "x", x, stream)?;
        aligned16(K, "w", w, stream)?;
        aligned16(K, "dy", dy, stream)?;
        aligned16(K, "dx", dx, stream)?;
        let acc = accumulate as i32;
        let mut a = stream.launch_builder(&self.f.rmsnorm_bwd);
        a.arg(x)
            .arg(w)
            .arg(rstd)
            .arg(dy)
            .arg(dx)
            .arg(&rows_i)
            .arg(&dim_i)
            .arg(&ld_i)
            .arg(&acc);
        launch(a, cfg(rows as u32, (threads, 1)))
    }

    /// cos/sin tables [tokens, inv_freq.len()] for per-token positions.
    pub fn rope_cos_sin(
        &self,
        stream: &CudaStream,
        positions: &CudaView<u32>,
        inv_freq: &CudaView<f32>,
        cos: &mut CudaViewMut<f32>,
        sin: &mut CudaViewMut<f32>,
    ) -> Result<(), KernelError> {
        const K: &str = "rope_cos_sin";
        let (tokens, half) = (positions.len(), inv_freq.len());
        check_len(K, "cos", cos.len(), tokens * half)?;
        check_len(K, "sin", sin.len(), tokens * half)?;
        let n = tokens * half;
        to_i32(K, "tokens * head_dim/2", n)?;
        let (t_i, h_i) = (tokens as i32, half as i32);
        let mut a = stream.launch_builder(&self.f.rope_cos_sin);
        a.arg(positions)
            .arg(inv_freq)
            .arg(cos)
            .arg(sin)
            .arg(&t_i)
            .arg(&h_i);
        launch(a, cfg(grid(n, THREADS as usize, u32::MAX), (THREADS, 1)))
    }

    /// Rotates q (`hq` heads per token, row stride `q_stride`) and k in place;
    /// `inverse` applies the transpose rotation (the backward pass on dq/dk).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_apply(
        &self,
        stream: &CudaStream,
        q: &mut CudaViewMut<bf16>,
        q_stride: usize,
        hq: usize,
        k: Option<(&mut CudaViewMut<bf16>, usize, usize)>,
        cos: &CudaView<f32>,
        sin: &CudaView<f32>,
        tokens: usize,
        head_dim: usize,
        inverse: bool,
    ) -> Result<(), KernelError> {
        const K: &str = "rope_apply";
        if !head_dim.is_multiple_of(4) || head_dim / 4 > 1024 || head_dim == 0 {
            return Err(shape(
                K,
                format!("head_dim {head_dim} must be a positive multiple of 4, at most 4096"),
            ));
        }
        let need = |stride: usize, heads: usize| {
            if tokens == 0 {
                0
            } else {
                (tokens - 1) * stride + heads * head_dim
            }
        };
        if !q_stride.is_multiple_of(2) || q_stride < hq * head_dim {
            return Err(shape(
                K,
                format!("q_stride {q_stride} must be even and hold {hq} heads"),
            ));
        }
        check_len(K, "q", q.len(), need(q_stride, hq))?;
        check_len(K, "cos", cos.len(), tokens * head_dim / 2)?;
        check_len(K, "sin", sin.len(), tokens * head_dim / 2)?;
        let bx = (head_dim / 4) as u32;
        let by = (THREADS / bx).max(1);
        let config = cfg(grid(tokens, by as usize, u32::MAX), (bx, by));
        let dir: f32 = if inverse { -1.0 } else { 1.0 };
        let (q_stride_i, hq_i) = (to_i32(K, "q_stride", q_stride)?, to_i32(K, "hq", hq)?);
        let (t_i, d_i) = (to_i32(K, "tokens", tokens)?, head_dim as i32);
        let mut a = stream.launch_builder(&self.f.rope_apply);
        a.arg(q).arg(&q_stride_i).arg(&hq_i);
        let (k_stride_i, hk_i);
        match k {
            Some((k, k_stride, hk)) => {
                if !k_stride.is_multiple_of(2) || k_stride < hk * head_dim {
                    return Err(shape(
                        K,
                        format!("k_stride {k_stride} must be even and hold {hk} heads"),
                    ));
                }
                check_len(K, "k", k.len(), need(k_stride, hk))?;
                k_stride_i = to_i32(K, "k_stride", k_stride)?;
                hk_i = to_i32(K, "hk", hk)?;
                a.arg(k);
            }
            None => {
                k_stride_i = 0;
                hk_i = 0;
                a.arg(&NULL_PTR);
            }
        }
        a.arg(&k_stride_i)
            .arg(&hk_i)
            .arg(cos)
            .arg(sin)
            .arg(&t_i)
            .arg(&d_i)
            .arg(&dir);
        launch(a, config)
    }

    /// h = silu(g) * u over [rows, cols] with row strides (elements).
    #[allow(clippy::too_many_arguments)]
    pub fn swiglu_fwd(
        &self,
        stream: &CudaStream,
        g: (&CudaView<bf16>, usize),
        u: (&CudaView<bf16>, usize),
        h: (&mut CudaViewMut<bf16>, usize),
        rows: usize,
        cols: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "swiglu_fwd";
        swiglu_check(
            K,
            cols,
            rows,
            &[
                ("g", g.0.len(), g.1),
                ("u", u.0.len(), u.1),
                ("h", h.0.len(), h.1),
            ],
        )?;
        aligned16(K, "g", g.0, stream)?;
        aligned16(K, "u", u.0, stream)?;
        aligned16(K, "h", &*h.0, stream)?;
        let (gs, us, hs) = (g.1 as i32, u.1 as i32, h.1 as i32);
        let (r_i, c_i) = (to_i32(K, "rows", rows)?, to_i32(K, "cols", cols)?);
        let mut a = stream.launch_builder(&self.f.swiglu_fwd);
        a.arg(g.0)
            .arg(&gs)
            .arg(u.0)
            .arg(&us)
            .arg(h.0)
            .arg(&hs)
            .arg(&r_i)
            .arg(&c_i);
        launch(
            a,
            cfg(
                grid(rows * cols / 8, THREADS as usize, self.stride_cap()),
                (THREADS, 1),
            ),
        )
    }

    /// SwiGLU backward in place: g becomes dg, u becomes du; `h`, when given, receives the
    /// recomputed forward output.
    #[allow(clippy::too_many_arguments)]
    pub fn swiglu_bwd(
        &self,
        stream: &CudaStream,
        dh: (&CudaView<bf16>, usize),
        g: (&mut CudaViewMut<bf16>, usize),
        u: (&mut CudaViewMut<bf16>, usize),
        h: Option<(&mut CudaViewMut<bf16>, usize)>,
        rows: usize,
        cols: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "swiglu_bwd";
        let hv = h.as_ref().map(|(h, hs)| (&**h, *hs));
        swiglu_bwd_check(K, stream, dh, (&*g.0, g.1), (&*u.0, u.1), hv, rows, cols)?;
        let (ds, gs, us) = (dh.1 as i32, g.1 as i32, u.1 as i32);
        let (r_i, c_i) = (to_i32(K, "rows", rows)?, to_i32(K, "cols", cols)?);
        let mut a = stream.launch_builder(&self.f.swiglu_bwd);
        a.arg(dh.0).arg(&ds).arg(g.0).arg(&gs).arg(u.0).arg(&us);
        let hs;
        match h {
            Some((h, stride)) => {
                hs = stride as i32;
                a.arg(h);
            }
            None => {
                hs = 0;
                a.arg(&NULL_PTR);
            }
        }
        a.arg(&hs).arg(&r_i).arg(&c_i);
        launch(
            a,
            cfg(
                grid(rows * cols / 8, THREADS as usize, self.stride_cap()),
                (THREADS, 1),
            ),
        )
    }

    /// Folds one vocabulary chunk of bf16 logits (`rows` rows, row stride `ld`, vocab ids
    /// v0..v0+vc) into the running row statistics; `first` starts them, `last` writes lse and
    /// loss. `targets` are vocab ids or -100.
    #[allow(clippy::too_many_arguments)]
    pub fn ce_stats(
        &self,
        stream: &CudaStream,
        logits: &CudaView<bf16>,
        ld: usize,
        rows: usize,
        v0: usize,
        vc: usize,
        targets: &CudaView<i32>,
        stats: &mut CrossEntropyRows,
        first: bool,
        last: bool,
    ) -> Result<(), KernelError> {
        const K: &str = "ce_stats";
        if rows == 0 {
            return Ok(());
        }
        ce_check(K, logits.len(), ld, rows, vc, targets.len())?;
        check_len(K, "row statistics", stats.rows(), rows)?;
        let (ld_i, r_i) = (ld as i64, to_i32(K, "rows", rows)?);
        let (v0_i, vc_i) = (to_i32(K, "v0", v0)?, to_i32(K, "vc", vc)?);
        let (first_i, last_i) = (first as i32, last as i32);
        let mut a = stream.launch_builder(&self.f.ce_stats);
        a.arg(logits)
            .arg(&ld_i)
            .arg(&r_i)
            .arg(&v0_i)
            .arg(&vc_i)
            .arg(targets);
        a.arg(&mut stats.run_max)
            .arg(&mut stats.run_sum)
            .arg(&mut stats.target_logit);
        a.arg(&mut stats.lse)
            .arg(&mut stats.loss)
            .arg(&first_i)
            .arg(&last_i);
        launch(a, cfg(rows as u32, (THREADS, 1)))
    }

    /// Overwrites a logits chunk with dL/dlogits = (softmax - onehot) * scale (after the last
    /// ce_stats of these rows).
    #[allow(clippy::too_many_arguments)]
    pub fn ce_grad(
        &self,
        stream: &CudaStream,
        logits: &mut CudaViewMut<bf16>,
        ld: usize,
        rows: usize,
        v0: usize,
        vc: usize,
        targets: &CudaView<i32>,
        lse: &CudaView<f32>,
        scale: f32,
    ) -> Result<(), KernelError> {
        const K: &str = "ce_grad";
        if rows == 0 {
            return Ok(());
        }
        ce_check(K, logits.len(), ld, rows, vc, targets.len())?;
        check_len(K, "lse", lse.len(), rows)?;
        let (ld_i, r_i) = (ld as i64, to_i32(K, "rows", rows)?);
        let (v0_i, vc_i) = (to_i32(K, "v0", v0)?, to_i32(K, "vc", vc)?);
        let mut a = stream.launch_builder(&self.f.ce_grad);
        a.arg(logits)
            .arg(&ld_i)
            .arg(&r_i)
            .arg(&v0_i)
            .arg(&vc_i)
            .arg(targets)
            .arg(lse)
            .arg(&scale);
        launch(a, cfg(rows as u32, (THREADS, 1)))
    }

    /// One AdamW step over a flat fp32 arena (torch or bitsandbytes order, per `step.mode`).
    /// `clip` is the device scalar from [`Kernels::grad_norm`] or None; `shadow`, when given,
    /// receives the updated parameters in bf16 (the copy the GEMMs read).
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_fp32(
        &self,
        stream: &CudaStream,
        params: &mut CudaViewMut<f32>,
        grads: &CudaView<f32>,
        m: &mut CudaViewMut<f32>,
        v: &mut CudaViewMut<f32>,
        step: &AdamStep,
        clip: Option<&CudaView<f32>>,
        shadow: Option<&mut CudaViewMut<bf16>>,
    ) -> Result<(), KernelError> {
        const K: &str = "adamw_fp32";
        let n = params.len();
        for (what, len) in [("grads", grads.len()), ("m", m.len()), ("v", v.len())] {
            check_len(K, what, len, n)?;
        }
        let n_i = n as i64;
        let mode = step.mode as i32;
        let mut a = stream.launch_builder(&self.f.adamw_fp32);
        a.arg(params).arg(grads).arg(m).arg(v).arg(&n_i);
        a.arg(&step.beta1)
            .arg(&step.beta2)
            .arg(&step.step_size)
            .arg(&step.bc2_sqrt);
        a.arg(&step.eps).arg(&step.decay).arg(&mode);
        push_opt(&mut a, clip);
        push_shadow(K, &mut a, shadow, n)?;
        launch(
            a,
            cfg(grid(n, THREADS as usize, self.stride_cap()), (THREADS, 1)),
        )
    }

    /// One bitsandbytes AdamW8bit step over a flat fp32 arena whose tensors start at multiples
    /// of 256 values.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_8bit(
        &self,
        stream: &CudaStream,
        params: &mut CudaViewMut<f32>,
        grads: &CudaView<f32>,
        states: &mut Adam8bitStates<'_>,
        maps: &QuantMaps,
        step: &AdamStep,
        clip: Option<&CudaView<f32>>,
        shadow: Option<&mut CudaViewMut<bf16>>,
    ) -> Result<(), KernelError> {
        const K: &str = "adamw_8bit";
        if step.mode != AdamMode::Bitsandbytes {
            return Err(shape(K, "8-bit states follow bitsandbytes' update order: build the step with AdamStep::bitsandbytes"));
        }
        let n = params.len();
        let blocks = n.div_ceil(Q8_BLOCK);
        check_len(K, "grads", grads.len(), n)?;
        check_len(K, "m_codes", states.m_codes.len(), n)?;
        check_len(K, "v_codes", states.v_codes.len(), n)?;
        check_len(K, "m_absmax", states.m_absmax.len(), blocks)?;
        check_len(K, "v_absmax", states.v_absmax.len(), blocks)?;
        // 16-byte vectors of p and g, 8-byte vectors of codes at multiples of 8 values.
        aligned16(K, "params", &*params, stream)?;
        aligned16(K, "grads", grads, stream)?;
        aligned16(K, "m_codes", &states.m_codes, stream)?;
        aligned16(K, "v_codes", &states.v_codes, stream)?;
        if let Some(s) = &shadow {
            aligned16(K, "shadow", &**s, stream)?;
        }
        let n_i = n as i64;
        let mut a = stream.launch_builder(&self.f.adamw_8bit);
        a.arg(params)
            .arg(grads)
            .arg(&mut states.m_codes)
            .arg(&mut states.m_absmax);
        a.arg(&mut states.v_codes)
            .arg(&mut states.v_absmax)
            .arg(&maps.signed)
            .arg(&maps.unsigned);
        a.arg(&n_i)
            .arg(&step.beta1)
            .arg(&step.beta2)
            .arg(&step.step_size)
            .arg(&step.eps);
        a.arg(&step.decay);
        push_opt(&mut a, clip);
        push_shadow(K, &mut a, shadow, n)?;
        // One warp per quantisation block, 8 warps per CUDA block.
        launch(a, cfg(grid(blocks, 8, self.stride_cap()), (THREADS, 1)))
    }

    fn reduce_partial(
        &self,
        stream: &CudaStream,
        x: &CudaView<f32>,
        square: bool,
        partials: &mut CudaViewMut<f32>,
    ) -> Result<i32, KernelError> {
        const K: &str = "reduce_partial";
        if partials.is_empty() {
            return Err(shape(K, "partials buffer is empty"));
        }
        let parts = grid(
            x.len(),
            THREADS as usize,
            (partials.len().min(REDUCE_PARTS)) as u32,
        );
        let n_i = x.len() as i64;
        let sq = square as i32;
        let mut a = stream.launch_builder(&self.f.reduce_partial);
        a.arg(x).arg(&n_i).arg(&sq).arg(partials);
        launch(a, cfg(parts, (THREADS, 1)))?;
        Ok(parts as i32)
    }

    /// out[0] = scale * sum(x), deterministic; `partials` is scratch (≤ REDUCE_PARTS used).
    pub fn sum(
        &self,
        stream: &CudaStream,
        x: &CudaView<f32>,
        scale: f32,
        partials: &mut CudaViewMut<f32>,
        out: &mut CudaViewMut<f32>,
    ) -> Result<(), KernelError> {
        check_len("reduce_final", "out", out.len(), 1)?;
        let parts = self.reduce_partial(stream, x, false, partials)?;
        let mut a = stream.launch_builder(&self.f.reduce_final);
        a.arg(&mut *partials).arg(&parts).arg(&scale).arg(out);
        launch(a, cfg(1, (32, 1)))
    }

    /// Global L2 norm of `grads` into norm[0] and torch's clip coefficient into coef[0]
    /// (min(1, max_norm/(norm+1e-6)); 1 when max_norm <= 0), all on the device.
    pub fn grad_norm(
        &self,
        stream: &CudaStream,
        grads: &CudaView<f32>,
        max_norm: f32,
        partials: &mut CudaViewMut<f32>,
        norm: &mut CudaViewMut<f32>,
        coef: &mut CudaViewMut<f32>,
    ) -> Result<(), KernelError> {
        check_len("grad_norm_final", "norm", norm.len(), 1)?;
        check_len("grad_norm_final", "coef", coef.len(), 1)?;
        let parts = self.reduce_partial(stream, grads, true, partials)?;
        let mut a = stream.launch_builder(&self.f.grad_norm_final);
        a.arg(&mut *partials)
            .arg(&parts)
            .arg(&max_norm)
            .arg(norm)
            .arg(coef);
        launch(a, cfg(1, (32, 1)))
    }

    /// `dsts[p] += src[p·n..(p+1)·n]` for each of the (one to three) destinations, `n` values
    /// each: one launch for the blocks of a stacked product.
    pub fn add_blocks_f32(
        &self,
        stream: &CudaStream,
        src: &CudaView<f32>,
        dsts: &mut [CudaViewMut<f32>],
    ) -> Result<(), KernelError> {
        const K: &str = "add_blocks_f32";
        let parts = dsts.len();
        if !(1..=3).contains(&parts) {
            return Err(shape(K, format!("{parts} destinations, 1 to 3 per launch")));
        }
        let n = dsts[0].len();
        if dsts.iter().any(|d| d.len() != n) {
            return Err(shape(K, "destinations of different lengths".to_string()));
        }
        check_len(K, "src", src.len(), parts * n)?;
        if n == 0 {
            return Ok(());
        }
        let n_i = n as i64;
        let mut a = stream.launch_builder(&self.f.add_blocks_f32);
        a.arg(src).arg(&n_i);
        for d in dsts.iter_mut() {
            a.arg(d);
        }
        // Unused destinations are null: the grid's rows stop at `parts`.
        let null: u64 = 0;
        for _ in parts..3 {
            a.arg(&null);
        }
        let x = grid(n, THREADS as usize, self.stride_cap());
        launch(
            a,
            LaunchConfig {
                grid_dim: (x, parts as u32, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
        )
    }

    /// NF4-quantises bf16 weights (n % 64 == 0): packed [n/2], absmax [n/64].
    pub fn nf4_quantize(
        &self,
        stream: &CudaStream,
        w: &CudaView<bf16>,
        packed: &mut CudaViewMut<u8>,
        absmax: &mut CudaViewMut<f32>,
    ) -> Result<(), KernelError> {
        const K: &str = "nf4_quantize";
        let n = nf4_check(K, w.len(), packed.len(), absmax.len())?;
        aligned16(K, "w", w, stream)?;
        let n_i = n as i64;
        let mut a = stream.launch_builder(&self.f.nf4_quantize);
        a.arg(w).arg(&n_i).arg(packed).arg(absmax);
        // 8 warps per block, one warp per 64-value block.
        launch(
            a,
            cfg(grid(n / NF4_BLOCK, 8, self.stride_cap() * 2), (THREADS, 1)),
        )
    }

    /// Dequantises NF4 into `out` (bf16, n = out.len()), with plain fp32 absmax or with the
    /// double-quantised statistics (`dq`; `maps.signed` is their code).
    pub fn nf4_dequantize(
        &self,
        stream: &CudaStream,
        packed: &CudaView<u8>,
        absmax: Nf4Absmax<'_, '_>,
        out: &mut CudaViewMut<bf16>,
    ) -> Result<(), KernelError> {
        let n = out.len();
        self.nf4_dequantize_rows(stream, packed, absmax, (out, n, n), n)
    }

    /// [`Kernels::nf4_dequantize`] of `n` values, rows of `cols`, into `out`'s rows `ld`
    /// elements apart (`(out, cols, ld)`; both multiples of 8, `cols` of `n`).
    pub fn nf4_dequantize_rows(
        &self,
        stream: &CudaStream,
        packed: &CudaView<u8>,
        absmax: Nf4Absmax<'_, '_>,
        (out, cols, ld): (&mut CudaViewMut<bf16>, usize, usize),
        n: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "nf4_dequantize";
        if !n.is_multiple_of(NF4_BLOCK) {
            return Err(shape(
                K,
                format!("{n} values: NF4 needs a multiple of {NF4_BLOCK}"),
            ));
        }
        if cols == 0
            || !cols.is_multiple_of(8)
            || !n.is_multiple_of(cols)
            || ld < cols
            || !ld.is_multiple_of(8)
        {
            return Err(shape(
                K,
                format!("rows of {cols} values {ld} apart: both need to be multiples of 8, {cols} of {n}, and {ld} ≥ {cols}"),
            ));
        }
        let rows = n / cols;
        let groups_out = ((rows - 1) * ld + cols) / 8;
        if u32::try_from(groups_out).is_err() {
            return Err(shape(
                K,
                format!("{n} values exceed the kernel's 32-bit indexing"),
            ));
        }
        check_len(K, "out", out.len(), (rows - 1) * ld + cols)?;
        check_len(K, "packed", packed.len(), n / 2)?;
        aligned16(K, "out", &*out, stream)?;
        aligned16(K, "packed", packed, stream)?;
        let (n_i, cols8, ld8) = (n as i64, (cols / 8) as u32, (ld / 8) as u32);
        let config = cfg(
            grid(n / 8, THREADS as usize, self.stride_cap() * 2),
            (THREADS, 1),
        );
        match absmax {
            Nf4Absmax::Plain(absmax) => {
                check_len(K, "absmax", absmax.len(), n / NF4_BLOCK)?;
                let mut a = stream.launch_builder(&self.f.nf4_dequantize);
                a.arg(packed)
                    .arg(absmax)
                    .arg(&n_i)
                    .arg(&cols8)
                    .arg(&ld8)
                    .arg(out);
                launch(a, config)
            }
            Nf4Absmax::Double(dq, maps) => {
                let blocks = n / NF4_BLOCK;
                check_len(K, "qabsmax", dq.qabsmax.len(), blocks)?;
                check_len(K, "absmax2", dq.absmax2.len(), blocks.div_ceil(Q8_BLOCK))?;
                check_len(K, "offset", dq.offset.len(), 1)?;
                let mut a = stream.launch_builder(&self.f.nf4_dequantize_dq);
                a.arg(packed)
                    .arg(&dq.qabsmax)
                    .arg(&dq.absmax2)
                    .arg(&maps.signed);
                a.arg(&dq.offset).arg(&n_i).arg(&cols8).arg(&ld8).arg(out);
                launch(a, config)
            }
        }
    }

    /// Double quantisation of NF4 absmax values: offset[0] = mean(absmax), then 8-bit
    /// blockwise codes of absmax - offset with the signed map (`qabsmax`, `absmax2`).
    #[allow(clippy::too_many_arguments)]
    pub fn nf4_double_quantize(
        &self,
        stream: &CudaStream,
        absmax: &CudaView<f32>,
        maps: &QuantMaps,
        partials: &mut CudaViewMut<f32>,
        offset: &mut CudaViewMut<f32>,
        qabsmax: &mut CudaViewMut<u8>,
        absmax2: &mut CudaViewMut<f32>,
    ) -> Result<(), KernelError> {
        const K: &str = "quantize_blockwise_8bit";
        let n = absmax.len();
        check_len(K, "qabsmax", qabsmax.len(), n)?;
        check_len(K, "absmax2", absmax2.len(), n.div_ceil(Q8_BLOCK))?;
        self.sum(stream, absmax, 1.0 / n.max(1) as f32, partials, offset)?;
        let n_i = n as i64;
        let mut a = stream.launch_builder(&self.f.quantize_blockwise_8bit);
        a.arg(absmax)
            .arg(&n_i)
            .arg(&mut *offset)
            .arg(&maps.signed)
            .arg(qabsmax)
            .arg(absmax2);
        launch(
            a,
            cfg(grid(n, Q8_BLOCK, self.stride_cap()), (Q8_BLOCK as u32, 1)),
        )
    }

    /// out[t, :] = table[ids[t], :] (bf16 rows of `dim`, dim % 8 == 0).
    pub fn embedding_gather(
        &self,
        stream: &CudaStream,
        ids: &CudaView<u32>,
        table: &CudaView<bf16>,
        out: &mut CudaViewMut<bf16>,
        dim: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "embedding_gather";
        if dim == 0 || !dim.is_multiple_of(8) {
            return Err(shape(
                K,
                format!("dim {dim} must be a positive multiple of 8"),
            ));
        }
        let tokens = ids.len();
        check_len(K, "out", out.len(), tokens * dim)?;
        aligned16(K, "table", table, stream)?;
        aligned16(K, "out", &*out, stream)?;
        let vocab = to_i32(K, "vocab", table.len() / dim)?;
        let (t_i, d_i) = (to_i32(K, "tokens", tokens)?, dim as i32);
        let mut a = stream.launch_builder(&self.f.embedding_gather);
        a.arg(ids)
            .arg(table)
            .arg(out)
            .arg(&t_i)
            .arg(&d_i)
            .arg(&vocab);
        launch(
            a,
            cfg(
                grid(tokens * dim / 8, THREADS as usize, self.stride_cap()),
                (THREADS, 1),
            ),
        )
    }

    /// Copies `rows` rows of `cols` values from `src` (rows `src.1` apart) into `dst` (rows
    /// `dst.1` apart); `cols` and both strides multiples of 8.
    pub fn copy_rows(
        &self,
        stream: &CudaStream,
        (src, src_ld): (&CudaView<bf16>, usize),
        (dst, dst_ld): (&mut CudaViewMut<bf16>, usize),
        rows: usize,
        cols: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "copy_rows";
        if rows == 0 {
            return Ok(());
        }
        copy_shape(K, cols, src_ld, dst_ld)?;
        check_len(K, "src", src.len(), (rows - 1) * src_ld + cols)?;
        check_len(K, "dst", dst.len(), (rows - 1) * dst_ld + cols)?;
        aligned16(K, "src", src, stream)?;
        aligned16(K, "dst", &*dst, stream)?;
        let (src8, dst8) = (
            to_i32(K, "src_ld", src_ld / 8)?,
            to_i32(K, "dst_ld", dst_ld / 8)?,
        );
        let (rows_i, cols8) = (to_i32(K, "rows", rows)?, to_i32(K, "cols", cols / 8)?);
        let mut a = stream.launch_builder(&self.f.copy_rows);
        a.arg(src)
            .arg(&src8)
            .arg(dst)
            .arg(&dst8)
            .arg(&rows_i)
            .arg(&cols8);
        launch(
            a,
            cfg(
                grid(rows * cols / 8, THREADS as usize, self.stride_cap()),
                (THREADS, 1),
            ),
        )
    }
}

/// What the row-copy kernels need of a copy's shape: `cols` and both row strides multiples of 8
/// (16-byte vectors), strides at least `cols`.
fn copy_shape(
    kernel: &'static str,
    cols: usize,
    src_ld: usize,
    dst_ld: usize,
) -> Result<(), KernelError> {
    if cols == 0 || [cols, src_ld, dst_ld].iter().any(|v| !v.is_multiple_of(8)) {
        return Err(shape(
            kernel,
            format!("cols {cols} and row strides {src_ld}, {dst_ld} must be multiples of 8"),
        ));
    }
    if src_ld < cols || dst_ld < cols {
        return Err(shape(
            kernel,
            format!("row strides {src_ld}, {dst_ld} below cols {cols}"),
        ));
    }
    Ok(())
}

/// One strided row copy of a [`CopyTable`]: `rows` rows of `cols` bf16 values from `src` (rows
/// `src_ld` apart) to `dst` (rows `dst_ld` apart), in 16-byte vectors (the kernel's `CopyJob`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyJob {
    src: u64,
    dst: u64,
    src_ld8: i32,
    dst_ld8: i32,
    rows: i32,
    cols8: i32,
}

impl CopyJob {
    /// Checks what the kernel needs: `cols` and both strides multiples of 8 (strides at least
    /// `cols`), both addresses 16-byte aligned.
    pub fn new(
        (dst, dst_ld): (u64, usize),
        (src, src_ld): (u64, usize),
        cols: usize,
        rows: usize,
    ) -> Result<Self, KernelError> {
        const K: &str = "copy_rows_batch";
        copy_shape(K, cols, src_ld, dst_ld)?;
        if !src.is_multiple_of(16) || !dst.is_multiple_of(16) {
            return Err(shape(K, "addresses must be 16-byte aligned".to_string()));
        }
        Ok(CopyJob {
            src,
            dst,
            src_ld8: to_i32(K, "src_ld", src_ld / 8)?,
            dst_ld8: to_i32(K, "dst_ld", dst_ld / 8)?,
            rows: to_i32(K, "rows", rows)?,
            cols8: to_i32(K, "cols", cols / 8)?,
        })
    }

    fn vectors(&self) -> usize {
        self.rows as usize * self.cols8 as usize
    }

    /// The kernel's 32-byte `CopyJob` as four little-endian words.
    fn words(&self) -> [u64; 4] {
        let pair = |lo: i32, hi: i32| lo as u32 as u64 | (hi as u32 as u64) << 32;
        [
            self.src,
            self.dst,
            pair(self.src_ld8, self.dst_ld8),
            pair(self.rows, self.cols8),
        ]
    }
}

/// A table of [`CopyJob`]s on the device, run by one [`Kernels::copy_rows_batch`] launch.
pub struct CopyTable {
    jobs: CudaSlice<u64>,
    count: usize,
    widest: usize,
}

impl CopyTable {
    /// Uploads `jobs`.
    ///
    /// # Safety
    /// Every job's `src` and `dst` must address live device buffers of the job's extent
    /// (`(rows - 1) * ld + cols` values), not overlapping, whenever the table is launched.
    pub unsafe fn new(stream: &Arc<CudaStream>, jobs: &[CopyJob]) -> Result<Self, KernelError> {
        let words: Vec<u64> = jobs.iter().flat_map(|j| j.words()).collect();
        Ok(CopyTable {
            jobs: stream.clone_htod(&words)?,
            count: jobs.len(),
            widest: jobs.iter().map(CopyJob::vectors).max().unwrap_or(0),
        })
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

impl Kernels {
    /// Runs every copy of `table` in one launch (a grid row per job).
    pub fn copy_rows_batch(
        &self,
        stream: &CudaStream,
        table: &CopyTable,
    ) -> Result<(), KernelError> {
        const K: &str = "copy_rows_batch";
        if table.is_empty() {
            return Ok(());
        }
        let jobs = to_i32(K, "jobs", table.count)?;
        if jobs > 65_535 {
            return Err(shape(K, format!("{jobs} jobs, at most 65,535 per launch")));
        }
        let mut a = stream.launch_builder(&self.f.copy_rows_batch);
        a.arg(&table.jobs);
        let x = grid(table.widest, THREADS as usize, self.stride_cap());
        launch(
            a,
            LaunchConfig {
                grid_dim: (x, jobs as u32, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
        )
    }
}

impl Kernels {
    /// LoRA dropout with a regenerable mask: out = (accumulate ? out : 0) + mask ⊙ x / (1-p),
    /// mask from (seed, index) only — the backward calls it again with the same seed on the
    /// gradient. `threshold`/`scale` from [`crate::reference::dropout::dropout_params`].
    #[allow(clippy::too_many_arguments)]
    pub fn dropout_apply(
        &self,
        stream: &CudaStream,
        x: &CudaView<bf16>,
        out: &mut CudaViewMut<bf16>,
        threshold: u32,
        scale: f32,
        seed: u64,
        accumulate: bool,
    ) -> Result<(), KernelError> {
        const K: &str = "dropout_apply";
        let n = x.len();
        if !n.is_multiple_of(8) {
            return Err(shape(K, format!("{n} values: needs a multiple of 8")));
        }
        check_len(K, "out", out.len(), n)?;
        aligned16(K, "x", x, stream)?;
        aligned16(K, "out", &*out, stream)?;
        let (n_i, acc) = (n as i64, accumulate as i32);
        let mut a = stream.launch_builder(&self.f.dropout_apply);
        a.arg(x)
            .arg(out)
            .arg(&n_i)
            .arg(&threshold)
            .arg(&scale)
            .arg(&seed)
            .arg(&acc);
        launch(
            a,
            cfg(
                grid(n / 8, THREADS as usize, self.stride_cap()),
                (THREADS, 1),
            ),
        )
    }
}

fn push_shadow<'a>(
    kernel: &'static str,
    a: &mut LaunchArgs<'a>,
    shadow: Option<&'a mut CudaViewMut<'_, bf16>>,
    n: usize,
) -> Result<(), KernelError> {
    match shadow {
        Some(s) => {
            check_len(kernel, "shadow", s.len(), n)?;
            a.arg(s);
        }
        None => {
            a.arg(&NULL_PTR);
        }
    }
    Ok(())
}

/// How NF4 absmax values are stored.
pub enum Nf4Absmax<'a, 'b> {
    Plain(&'a CudaView<'b, f32>),
    Double(&'a Nf4DoubleQuant<'b>, &'a QuantMaps),
}

fn push_opt<'a>(a: &mut LaunchArgs<'a>, v: Option<&'a CudaView<'_, f32>>) {
    match v {
        Some(v) => a.arg(v),
        None => a.arg(&NULL_PTR),
    };
}

/// What both RMSNorm launchers check about their shape — `dim`, the output's row stride `ld`
/// (≥ dim, a multiple of 8) and length, the weight's and rstd's lengths `(w, rstd)` — and the
/// launch's block size and integer arguments `(threads, rows, dim, ld)`.
fn rms_rows(
    kernel: &'static str,
    rows: usize,
    dim: usize,
    (out, out_len, ld): (&str, usize, usize),
    (w_len, rstd_len): (usize, usize),
) -> Result<(u32, i32, i32, i32), KernelError> {
    let threads = rms_threads(kernel, dim)?;
    if ld < dim || !ld.is_multiple_of(8) {
        return Err(shape(
            kernel,
            format!("{out}'s row stride {ld} must be a multiple of 8 and at least dim {dim}"),
        ));
    }
    check_len(kernel, out, out_len, (rows - 1) * ld + dim)?;
    check_len(kernel, "w", w_len, dim)?;
    check_len(kernel, "rstd", rstd_len, rows)?;
    Ok((
        threads,
        to_i32(kernel, "rows", rows)?,
        to_i32(kernel, "dim", dim)?,
        to_i32(kernel, "row stride", ld)?,
    ))
}

fn rms_threads(kernel: &'static str, dim: usize) -> Result<u32, KernelError> {
    if dim == 0 || !dim.is_multiple_of(8) || dim > 8 * RMS_VECS * 1024 {
        return Err(shape(
            kernel,
            format!(
                "dim {dim} must be a positive multiple of 8, at most {}",
                8 * RMS_VECS * 1024
            ),
        ));
    }
    let per_thread = (dim / 8).div_ceil(RMS_VECS);
    Ok((per_thread.div_ceil(32) * 32).clamp(32, 1024) as u32)
}

/// The SwiGLU backward's layout contract (`swiglu_bwd`, `swiglu_lora_bwd`): `dh`, `g`, `u` and
/// the optional `h` `[rows, cols]` at their row strides, each 16-byte aligned.
#[allow(clippy::too_many_arguments)]
fn swiglu_bwd_check(
    kernel: &'static str,
    stream: &CudaStream,
    dh: (&CudaView<bf16>, usize),
    g: (&CudaViewMut<bf16>, usize),
    u: (&CudaViewMut<bf16>, usize),
    h: Option<(&CudaViewMut<bf16>, usize)>,
    rows: usize,
    cols: usize,
) -> Result<(), KernelError> {
    let mut bufs = vec![
        ("dh", dh.0.len(), dh.1),
        ("g", g.0.len(), g.1),
        ("u", u.0.len(), u.1),
    ];
    if let Some((h, hs)) = &h {
        bufs.push(("h", h.len(), *hs));
    }
    swiglu_check(kernel, cols, rows, &bufs)?;
    aligned16(kernel, "dh", dh.0, stream)?;
    aligned16(kernel, "g", g.0, stream)?;
    aligned16(kernel, "u", u.0, stream)?;
    if let Some((h, _)) = h {
        aligned16(kernel, "h", h, stream)?;
    }
    Ok(())
}

fn swiglu_check(
    kernel: &'static str,
    cols: usize,
    rows: usize,
    bufs: &[(&str, usize, usize)],
) -> Result<(), KernelError> {
    if !cols.is_multiple_of(8) {
        return Err(shape(
            kernel,
            format!("cols {cols} must be a multiple of 8"),
        ));
    }
    for &(what, len, stride) in bufs {
        if !stride.is_multiple_of(8) || stride < cols {
            return Err(shape(
                kernel,
                format!("{what} row stride {stride} must be a multiple of 8 and >= cols {cols}"),
            ));
        }
        to_i32(kernel, "stride", stride)?;
        check_len(kernel, what, len, strided_len(rows, stride, cols))?;
    }
    Ok(())
}

fn ce_check(
    kernel: &'static str,
    logits: usize,
    ld: usize,
    rows: usize,
    vc: usize,
    targets: usize,
) -> Result<(), KernelError> {
    if vc == 0 || ld < vc {
        return Err(shape(
            kernel,
            format!("chunk width {vc} must be positive and <= row stride {ld}"),
        ));
    }
    check_len(kernel, "targets", targets, rows)?;
    check_len(kernel, "logits", logits, strided_len(rows, ld, vc))
}

fn nf4_check(
    kernel: &'static str,
    n: usize,
    packed: usize,
    absmax: usize,
) -> Result<usize, KernelError> {
    if !n.is_multiple_of(NF4_BLOCK) {
        return Err(shape(
            kernel,
            format!("{n} values: NF4 needs a multiple of {NF4_BLOCK}"),
        ));
    }
    check_len(kernel, "packed", packed, n / 2)?;
    check_len(kernel, "absmax", absmax, n / NF4_BLOCK)?;
    Ok(n)
}

/// Where a module's cubin came from, for the [`LoadReport`].
enum Origin {
    Cached,
    /// Compiled now: the compiler's log, and the cache write's failure if it failed.
    Compiled {
        log: String,
        cache_error: Option<String>,
    },
}

/// Cubin of one module: from the cache when present, else compiled (and cached).
fn module_cubin(
    src: &'static KernelSource,
    arch: GpuArch,
    compiler: &str,
    cache: Option<&KernelCache>,
) -> Result<(Vec<u8>, Origin), KernelError> {
    let target = arch.nvrtc_target();
    let key = crate::cache::key(
        &src.program(),
        &target,
        &compile_options(src, arch),
        compiler,
    );
    if let Some(cubin) = cache.and_then(|c| c.get(src.name, &target, &key)) {
        return Ok((cubin, Origin::Cached));
    }
    let compiled = nvrtc::compile(src, arch)?;
    let cache_error = cache.and_then(|c| {
        c.put(src.name, &target, &key, &compiled.cubin)
            .err()
            .map(|e| format!("{}: {e}", c.dir().display()))
    });
    let origin = Origin::Compiled {
        log: compiled.log,
        cache_error,
    };
    Ok((compiled.cubin, origin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rmsnorm_block_holds_the_row_in_registers() {
        // 4096 = 512 vectors = 4 per thread over 128 threads.
        assert_eq!(rms_threads("t", 4096).unwrap(), 128);
        assert_eq!(rms_threads("t", 128).unwrap(), 32);
        assert_eq!(rms_threads("t", 32768).unwrap(), 1024);
        for bad in [0, 12, 32776] {
            assert!(rms_threads("t", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn copy_jobs_check_their_shape_and_pack_the_kernels_struct() {
        let job = CopyJob::new((0x1000, 4128), (0x2000, 16), 16, 4096).unwrap();
        // src, dst, (src_ld8 | dst_ld8 << 32), (rows | cols8 << 32): the kernel's CopyJob.
        assert_eq!(job.words(), [0x2000, 0x1000, 2 | 516 << 32, 4096 | 2 << 32]);
        assert_eq!(job.vectors(), 4096 * 2);
        // Columns or strides off the 16-byte grid, a stride shorter than a row, a misaligned
        // address: each would make the kernel read or write outside the rows it was given.
        for (dst, src, cols) in [
            ((0x1000, 4128), (0x2000, 16), 12),
            ((0x1000, 4124), (0x2000, 16), 16),
            ((0x1000, 8), (0x2000, 16), 16),
            ((0x1008, 4128), (0x2000, 16), 16),
            ((0x1000, 4128), (0x2000, 16), 0),
        ] {
            assert!(
                CopyJob::new(dst, src, cols, 1).is_err(),
                "{dst:?} {src:?} {cols}"
            );
        }
    }

    #[test]
    fn layout_contracts_reject_what_the_kernels_cannot_read() {
        assert!(swiglu_check("t", 16, 2, &[("g", 32, 16)]).is_ok());
        // Strided rows need (rows-1)*stride + cols elements, not rows*stride.
        assert!(swiglu_check("t", 16, 2, &[("g", 40, 24)]).is_ok());
        assert!(swiglu_check("t", 16, 2, &[("g", 39, 24)]).is_err());
        assert!(swiglu_check("t", 12, 2, &[("g", 24, 12)]).is_err());
        assert!(swiglu_check("t", 16, 2, &[("g", 64, 20)]).is_err());
        assert!(ce_check("t", 3 * 10 + 4, 10, 4, 4, 4).is_ok());
        assert!(ce_check("t", 3 * 10 + 3, 10, 4, 4, 4).is_err());
        assert!(ce_check("t", 100, 10, 4, 11, 4).is_err());
        assert!(ce_check("t", 100, 10, 4, 4, 3).is_err());
        assert_eq!(nf4_check("t", 128, 64, 2).unwrap(), 128);
        assert!(nf4_check("t", 96, 48, 2).is_err());
        assert!(nf4_check("t", 128, 63, 2).is_err());
    }

    #[test]
    fn grids_cover_the_work_and_respect_the_cap() {
        assert_eq!(grid(0, 256, 100), 1);
        assert_eq!(grid(257, 256, 100), 2);
        assert_eq!(grid(1 << 30, 256, 100), 100);
    }
}
