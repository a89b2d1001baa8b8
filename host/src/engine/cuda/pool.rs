//! The high watermark of the device's stream-ordered memory pool, which every allocation of
//! this engine comes from (cudarc allocates with `cuMemAllocAsync` on the default pool).
//!
//! Bytes held by live allocations are what `torch.cuda.max_memory_allocated` counts for the
//! Python stacks we compare against; `cuMemGetInfo` differences count more (memory the pool
//! keeps reserved, library-internal allocations), so both are reported.

use anyhow::{ensure, Result};
use cudarc::driver::{sys, CudaContext};

const USED_HIGH: sys::CUmemPool_attribute = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
const USED_NOW: sys::CUmemPool_attribute =
    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT;

/// Reads (`set == false`) or writes `value` as one of the default pool's cuuint64_t attributes.
fn pool_attribute(
    ctx: &CudaContext,
    attribute: sys::CUmemPool_attribute,
    value: &mut u64,
    set: bool,
) -> Result<()> {
    ctx.bind_to_thread()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer; the device handle comes from a live context.
    let rc = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
    ensure!(
        rc == sys::CUresult::CUDA_SUCCESS,
        "cuDeviceGetDefaultMemPool: {rc:?}"
    );
    let ptr = (value as *mut u64).cast();
    // SAFETY: both attributes used here are cuuint64_t and `value` outlives the call (setting
    // USED_MEM_HIGH accepts only 0, which `reset_high` passes).
    let rc = unsafe {
        if set {
            sys::cuMemPoolSetAttribute(pool, attribute, ptr)
        } else {
            sys::cuMemPoolGetAttribute(pool, attribute, ptr)
        }
    };
    ensure!(
        rc == sys::CUresult::CUDA_SUCCESS,
        "cuMemPool{{Get,Set}}Attribute: {rc:?}"
    );
    Ok(())
}

/// Bytes held by live allocations from the pool now.
pub fn used_now(ctx: &CudaContext) -> Result<u64> {
    let mut bytes = 0;
    pool_attribute(ctx, USED_NOW, &mut bytes, false)?;
    Ok(bytes)
}

/// Most bytes held by live allocations from the pool at once since the last [`reset_high`].
pub fn used_high(ctx: &CudaContext) -> Result<u64> {
    let mut bytes = 0;
    pool_attribute(ctx, USED_HIGH, &mut bytes, false)?;
    Ok(bytes)
}

/// Sets the high watermark to zero; the next allocation raises it to every byte then held
/// (torch's `reset_peak_memory_stats`).
pub fn reset_high(ctx: &CudaContext) -> Result<()> {
    pool_attribute(ctx, USED_HIGH, &mut 0, true)
}
