//! The high watermark of the device's stream-ordered memory pool, which every allocation of
//! this engine comes from (cudarc allocates with `cuMemAllocAsync` on the default pool).
//!
//! Bytes held by live allocations are what `torch.cuda.max_memory_allocated` counts for the
//! Python stacks we compare against; `cuMemGetInfo` differences count more (memory the pool
//! keeps reserved, library-internal allocations), so both are reported.

use anyhow::{ensure, Result};
use cudarc::driver::{sys, CudaContext};

const USED_HIGH: sys::CUmemPool_attribute = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;

/// Reads (`set == false`) or writes `value` as the default pool's USED_MEM_HIGH attribute.
fn used_high_attribute(ctx: &CudaContext, value: &mut u64, set: bool) -> Result<()> {
    ctx.bind_to_thread()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer; the device handle comes from a live context.
    let rc = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
    ensure!(
        rc == sys::CUresult::CUDA_SUCCESS,
        "cuDeviceGetDefaultMemPool: {rc:?}"
    );
    let ptr = (value as *mut u64).cast();
    // SAFETY: USED_MEM_HIGH is a cuuint64_t attribute and `value` outlives the call (setting it
    // accepts only 0, which `reset_high` passes).
    let rc = unsafe {
        if set {
            sys::cuMemPoolSetAttribute(pool, USED_HIGH, ptr)
        } else {
            sys::cuMemPoolGetAttribute(pool, USED_HIGH, ptr)
        }
    };
    ensure!(
        rc == sys::CUresult::CUDA_SUCCESS,
        "cuMemPool{{Get,Set}}Attribute: {rc:?}"
    );
    Ok(())
}

/// Most bytes held by live allocations from the pool at once since the last [`reset_high`].
pub fn used_high(ctx: &CudaContext) -> Result<u64> {
    let mut bytes = 0;
    used_high_attribute(ctx, &mut bytes, false)?;
    Ok(bytes)
}

/// Sets the high watermark to zero; the next allocation raises it to every byte then held
/// (torch's `reset_peak_memory_stats`).
pub fn reset_high(ctx: &CudaContext) -> Result<()> {
    used_high_attribute(ctx, &mut 0, true)
}
