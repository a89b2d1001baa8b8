//! Page-locked host memory (the offload's buffers, the upload's staging), pinned in huge pages.
//!
//! `cuMemHostAlloc` pins 4 GiB in ≈ 1.5 s on the H200 machine — in every launch, before the
//! first step. An anonymous mapping advised to transparent huge pages and then registered with
//! the driver (`cuMemHostRegister`) takes ≈ 0.67 s: the kernel faults in 2 MiB pages instead of
//! 4 KiB ones, and the copies run at the same 55 GB/s (docs/perf-notes.md §25).

use std::sync::Arc;

use anyhow::{Context, Result};
use cudarc::driver::{sys, CudaContext};
use memmap2::{Advice, MmapMut, MmapOptions};

/// Transparent huge pages are 2 MiB on x86-64 and arm64 (with 4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;

/// `len` bytes of host memory, page-locked for the device of `ctx` (contents undefined until
/// written).
pub struct PinnedHost {
    ctx: Arc<CudaContext>,
    /// The start of the registered range: the first huge-page boundary inside `_map`.
    ptr: *mut u8,
    len: usize,
    /// Owns the mapping (unmapped on drop, after the range is unregistered).
    _map: MmapMut,
}

impl PinnedHost {
    pub fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self> {
        let len = len.max(1);
        // One huge page more than asked, so the range can start on a huge-page boundary.
        let mut map = MmapOptions::new()
            .len(len + HUGE_PAGE)
            .map_anon()
            .with_context(|| format!("cannot map {len} bytes of host memory to pin"))?;
        let offset = map.as_ptr().align_offset(HUGE_PAGE);
        // A hint: without transparent huge pages the registration below only takes longer.
        if let Err(e) = map.advise_range(Advice::HugePage, offset, len) {
            tracing::debug!("no transparent huge pages ({e}); pinning 4 KiB pages");
        }
        // SAFETY: `offset + len` lies inside the mapping (it is `HUGE_PAGE` longer than `len`).
        let ptr = unsafe { map.as_mut_ptr().add(offset) };
        ctx.bind_to_thread()?;
        // SAFETY: `ptr..ptr + len` is mapped, owned by this value and unregistered before it
        // is unmapped (Drop).
        unsafe { sys::cuMemHostRegister_v2(ptr.cast(), len, 0) }
            .result()
            .with_context(|| format!("cannot pin {len} bytes of host memory"))?;
        Ok(PinnedHost {
            ctx: ctx.clone(),
            ptr,
            len,
            _map: map,
        })
    }

    /// The first byte (device copies address the memory directly).
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        // Nothing to do about a failure here; the mapping goes either way.
        let _ = self.ctx.bind_to_thread();
        // SAFETY: registered in `new`; copies into it were ordered before the owner dropped it.
        let _ = unsafe { sys::cuMemHostUnregister(self.ptr.cast()) };
    }
}
