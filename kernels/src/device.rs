//! Loading the kernels onto a GPU and launching them.
//!
//! [`Kernels::load`] compiles (or fetches from the disk cache) every module for the context's
//! device and resolves every entry point once; each launch method then checks the arguments
//! against the kernel's layout contract (lengths, divisibility, 16-byte alignment) and enqueues
//! one kernel on the given stream. Buffers are the caller's: nothing here allocates per launch,
//! so the backend can preallocate activations and workspaces once per (batch, seq, model).

use std::sync::Arc;

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, DevicePtr, LaunchArgs, LaunchConfig};
use cudarc::nvrtc::Ptx;

pub use half::bf16;

use crate::arch::GpuArch;
use crate::cache::KernelCache;
use crate::ptxas::{self, FunctionResources};
use crate::sources::{self, compile_options, KernelSource};
use crate::{nvrtc, KernelError};

mod copy;
mod dropout;
mod flash;
mod lora_grads;
mod loss;
mod nf4;
mod norm;
mod optim;
mod rope;
mod swiglu;
mod tma;
pub use copy::{CopyJob, CopyTable};
pub use flash::{
    FlashBwdKernel, FlashBwdWork, FlashShape, FLASH_BLOCK, FLASH_BWD_ENV, FLASH_MAX_HEAD_DIM,
};
pub use lora_grads::{LoraAdapter, LORA_GRAD_RANKS};
pub use loss::CrossEntropyRows;
pub use nf4::{Nf4Absmax, Nf4DoubleQuant, QuantMaps};
pub use optim::Adam8bitStates;

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
    rope_dq_convert: CudaFunction,
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
            rope_dq_convert: get(&ROPE, "rope_dq_convert")?,
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
    fn grids_cover_the_work_and_respect_the_cap() {
        assert_eq!(grid(0, 256, 100), 1);
        assert_eq!(grid(257, 256, 100), 2);
        assert_eq!(grid(1 << 30, 256, 100), 100);
    }
}
