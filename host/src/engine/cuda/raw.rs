//! Device buffers addressed by raw pointer, seen as cudarc slices.
//!
//! The layer code passes activations between cuBLASLt calls as raw device addresses (views into
//! preallocated buffers, no borrow of the owner), while the kernel launchers take cudarc views.
//! [`Borrowed`] bridges the two without owning anything: it never frees the memory.

use std::mem::ManuallyDrop;
use std::sync::Arc;

use anyhow::Result;
use cudarc::driver::{sys, CudaSlice, CudaStream, CudaView, CudaViewMut};

/// `len` values of `T` at a device address owned elsewhere.
pub struct Borrowed<T> {
    slice: ManuallyDrop<CudaSlice<T>>,
}

impl<T> Borrowed<T> {
    /// # Safety
    /// `ptr` must address `len` values of `T` in device memory of the stream's context that
    /// outlive this value, and nothing may write them concurrently with a kernel reading them.
    pub unsafe fn new(stream: &Arc<CudaStream>, ptr: u64, len: usize) -> Self {
        Borrowed {
            slice: ManuallyDrop::new(stream.upgrade_device_ptr(ptr, len)),
        }
    }

    pub fn view(&self) -> CudaView<'_, T> {
        self.slice.slice(..)
    }

    pub fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.slice.slice_mut(..)
    }
}

impl<T> Drop for Borrowed<T> {
    fn drop(&mut self) {
        // SAFETY: taken once, here; `leak` gives the pointer up without freeing it.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        let _ = slice.leak();
    }
}

/// Copies `rows` rows of `cols` bf16 values from `src` (rows `src_ld` apart) to `dst` (rows
/// `dst_ld` apart), device to device, on `stream`.
///
/// # Safety
/// Both ranges must be live device memory of the stream's context, `(rows-1)·ld + cols`
/// values each, not overlapping, and ordered with their other users by the stream.
pub unsafe fn copy_rows_bf16(
    stream: &CudaStream,
    (dst, dst_ld): (u64, usize),
    (src, src_ld): (u64, usize),
    cols: usize,
    rows: usize,
) -> Result<()> {
    const B: usize = std::mem::size_of::<u16>();
    let copy = sys::CUDA_MEMCPY2D {
        srcXInBytes: 0,
        srcY: 0,
        srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        srcHost: std::ptr::null(),
        srcDevice: src,
        srcArray: std::ptr::null_mut(),
        srcPitch: src_ld * B,
        dstXInBytes: 0,
        dstY: 0,
        dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        dstHost: std::ptr::null_mut(),
        dstDevice: dst,
        dstArray: std::ptr::null_mut(),
        dstPitch: dst_ld * B,
        WidthInBytes: cols * B,
        Height: rows,
    };
    sys::cuMemcpy2DAsync_v2(&copy, stream.cu_stream()).result()?;
    Ok(())
}
