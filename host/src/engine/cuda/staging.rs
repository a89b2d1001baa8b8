//! The weights' host-to-device copies, through pinned staging buffers that several threads fill.
//!
//! A copy from pageable memory (the safetensors files' mappings) goes through the driver's own
//! staging, one CPU thread at ≈ 7 GB/s on the H200 machine — 2.3 s for an 8B model's 16 GB,
//! and more threads calling it do not go faster (docs/perf-notes.md §25). Here the CPU side is
//! split over threads into one pinned buffer while the copy engine drains the other.

use std::sync::Arc;

use anyhow::Result;
use cudarc::driver::{sys, CudaEvent, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr};
use rayon::prelude::*;

use super::pinned::PinnedHost;

/// Bytes per staging buffer: large enough that a copy's fixed costs vanish, small enough that
/// the first copy starts early.
const SLOT_BYTES: usize = 64 << 20;
/// Bytes each thread copies at a time.
const PART_BYTES: usize = 4 << 20;

/// One staging buffer and the copy that last read it.
struct Slot {
    host: PinnedHost,
    drained: Option<CudaEvent>,
}

/// Uploads on `stream` through two pinned staging buffers.
pub struct Staging {
    stream: Arc<CudaStream>,
    slot_bytes: usize,
    slots: [Slot; 2],
    next: usize,
    /// Bytes uploaded so far (for the log).
    copied: usize,
}

impl Staging {
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        Self::with_slot_bytes(stream, SLOT_BYTES)
    }

    /// Staging buffers of `slot_bytes` each (tests take small ones to cross many of them).
    pub fn with_slot_bytes(stream: &Arc<CudaStream>, slot_bytes: usize) -> Result<Self> {
        let ctx = stream.context();
        let slot = || -> Result<Slot> {
            Ok(Slot {
                host: PinnedHost::new(ctx, slot_bytes)?,
                drained: None,
            })
        };
        Ok(Staging {
            stream: stream.clone(),
            slot_bytes,
            slots: [slot()?, slot()?],
            next: 0,
            copied: 0,
        })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn bytes_copied(&self) -> usize {
        self.copied
    }

    /// `src` in a new device buffer. `src` may be dropped on return (the copies read the staging
    /// buffers); the buffer is ready for work queued after it on the stream.
    pub fn upload<T: DeviceRepr + Copy + Send + Sync>(
        &mut self,
        src: &[T],
    ) -> Result<CudaSlice<T>> {
        // SAFETY: every element is written by the copies below before the stream runs anything
        // that reads the buffer.
        let mut dst = unsafe { self.stream.alloc::<T>(src.len())? };
        let (base, _) = dst.device_ptr_mut(&self.stream);
        // SAFETY: a `T` is plain data (DeviceRepr + Copy), so its bytes can be read as such.
        let bytes = unsafe {
            std::slice::from_raw_parts(src.as_ptr().cast::<u8>(), std::mem::size_of_val(src))
        };
        for (k, chunk) in bytes.chunks(self.slot_bytes).enumerate() {
            let slot = &mut self.slots[self.next];
            self.next = 1 - self.next;
            if let Some(drained) = slot.drained.take() {
                drained.synchronize()?;
            }
            // SAFETY: the slot's copy has finished (waited above), so nothing else reads or
            // writes its `slot_bytes` bytes.
            let staged =
                unsafe { std::slice::from_raw_parts_mut(slot.host.as_mut_ptr(), chunk.len()) };
            staged
                .par_chunks_mut(PART_BYTES)
                .zip(chunk.par_chunks(PART_BYTES))
                .for_each(|(to, from)| to.copy_from_slice(from));
            let at = base + (k * self.slot_bytes) as u64;
            // SAFETY: `chunk.len()` bytes from the pinned slot into `dst` at offset
            // `k·slot_bytes` (inside it); the slot is not touched again before `drained`.
            unsafe {
                sys::cuMemcpyHtoDAsync_v2(
                    at,
                    staged.as_ptr().cast(),
                    chunk.len(),
                    self.stream.cu_stream(),
                )
            }
            .result()?;
            slot.drained = Some(self.stream.record_event(None)?);
        }
        self.copied += bytes.len();
        Ok(dst)
    }
}
