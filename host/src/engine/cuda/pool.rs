//! The high watermark of the device's stream-ordered memory pool, which every allocation of
//! this engine comes from (cudarc allocates with `cuMemAllocAsync` on the default pool).
//!
//! Bytes held by live allocations are what `torch.cuda.max_memory_allocated` counts for the
//! Python stacks we compare against; `cuMemGetInfo` differences count more (memory the pool
//! keeps reserved, library-internal allocations), so both are reported.

use anyhow::{ensure, Result};
use cudarc::driver::{sys, CudaContext};

fn default_pool(ctx: &CudaContext) -> Result<sys::CUmemoryPool> {
    ctx.bind_to_thread()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer; the device handle comes from a live context.
    let rc = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
    ensure!(
        rc == sys::CUresult::CUDA_SUCCESS,
        "cuDeviceGetDefaultMemPool: {rc:?}"
    );
    Ok(pool)
}

/// Most bytes held by live allocations from the pool at once since the last [`reset_high`].
pub fn used_high(ctx: &CudaContext) -> Result<u64> {
    let pool = default_pool(ctx)?;
    let mut bytes: u64 = 0;
    // SAFETY: USED_MEM_HIGH is a cuuint64_t attribute; `bytes` outlives the call.
    let rc = unsafe {
        sys::cuMemPoolGetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut bytes as *mut u64).cast(),
        )
    };
    ensure!(
        rc == sys::CUresult::CUDA_SUCCESS,
        "cuMemPoolGetAttribute: {rc:?}"
    );
    Ok(bytes)
}

/// Restarts the high watermark from the bytes held now (torch's `reset_peak_memory_stats`).
pub fn reset_high(ctx: &CudaContext) -> Result<()> {
    let pool = default_pool(ctx)?;
    let mut zero: u64 = 0;
    // SAFETY: setting USED_MEM_HIGH takes a pointer to a cuuint64_t whose only legal value is 0.
    let rc = unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut zero as *mut u64).cast(),
        )
    };
    ensure!(
        rc == sys::CUresult::CUDA_SUCCESS,
        "cuMemPoolSetAttribute: {rc:?}"
    );
    Ok(())
}
