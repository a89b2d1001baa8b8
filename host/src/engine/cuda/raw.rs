//! Device buffers addressed by raw pointer, seen as cudarc slices.
//!
//! The layer code passes activations between cuBLASLt calls as raw device addresses (views into
//! preallocated buffers, no borrow of the owner), while the kernel launchers take cudarc views.
//! [`Borrowed`] bridges the two without owning anything: it never frees the memory.

use std::mem::ManuallyDrop;
use std::sync::Arc;

use anyhow::Result;
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};
use ferrotune_kernels::device::{bf16, Kernels};

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

/// Elements that `rows` rows of `width` values, `ld` apart, span (0 for no rows): the length to
/// borrow for a strided view.
pub fn strided_len(rows: usize, ld: usize, width: usize) -> usize {
    if rows == 0 {
        0
    } else {
        (rows - 1) * ld + width
    }
}

/// Copies `rows` rows of `cols` bf16 values from `src` (rows `src_ld` apart) to `dst` (rows
/// `dst_ld` apart) on `stream` (the `copy_rows` kernel: `cols` and strides multiples of 8).
///
/// # Safety
/// Both ranges must be live device memory of the stream's context, `(rows-1)·ld + cols`
/// values each, not overlapping, and ordered with their other users by the stream.
pub unsafe fn copy_rows_bf16(
    stream: &Arc<CudaStream>,
    kernels: &Kernels,
    (dst, dst_ld): (u64, usize),
    (src, src_ld): (u64, usize),
    cols: usize,
    rows: usize,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let src = Borrowed::<bf16>::new(stream, src, strided_len(rows, src_ld, cols));
    let mut dst = Borrowed::<bf16>::new(stream, dst, strided_len(rows, dst_ld, cols));
    kernels.copy_rows(
        stream,
        (&src.view(), src_ld),
        (&mut dst.view_mut(), dst_ld),
        rows,
        cols,
    )?;
    Ok(())
}
