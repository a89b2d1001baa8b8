//! Hopper's TMA descriptors (`CUtensorMap`) for the attention kernels' tiles.
//!
//! On sm_90a the attention kernels load their 64 × D bf16 tiles with the tensor memory
//! accelerator: one thread issues a tile, the hardware swizzles it the way the wgmma descriptors
//! read it and zero-fills what lies past the sequence or the head. The descriptors are encoded
//! on the host per launch (a few microseconds of driver work, no GPU work) and passed by value.

use std::ffi::c_void;
use std::mem::MaybeUninit;

use cudarc::driver::sys::{
    self, CUtensorMap, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave,
    CUtensorMapL2promotion, CUtensorMapSwizzle,
};
use cudarc::driver::DeviceRepr;

use super::{shape, FLASH_BLOCK};
use crate::KernelError;

/// Columns per box: one 128-byte swizzled row of bf16, the width of the kernels' tile blocks.
const BOX_COLS: u32 = 64;

/// The forward's descriptors, one kernel parameter (`FaFwdMaps` in attention.cu).
#[repr(C)]
pub(super) struct FwdMaps {
    pub q: CUtensorMap,
    pub k: CUtensorMap,
    pub v: CUtensorMap,
}

/// The backward's descriptors (`FaBwdMaps`).
#[repr(C)]
pub(super) struct BwdMaps {
    pub q: CUtensorMap,
    pub k: CUtensorMap,
    pub v: CUtensorMap,
    pub dout: CUtensorMap,
}

// SAFETY: plain bytes with the layout of the kernels' parameter structs (128-byte descriptors
// in declaration order, no padding); the driver copies them into the parameter buffer.
unsafe impl DeviceRepr for FwdMaps {}
unsafe impl DeviceRepr for BwdMaps {}

/// A descriptor of the token-major bf16 matrix `[batch·seq, heads·head_dim]` at `ptr` (16-byte
/// aligned) as the 4-D tensor {head_dim, heads, seq, batch}, read in boxes of 64 columns × one
/// head × 64 rows × one batch row with the 128-byte swizzle: a box is one [64][64] block of the
/// kernels' swizzled tiles, and rows past `seq` or columns past `head_dim` arrive as zeros.
pub(super) fn tile_map(
    kernel: &'static str,
    what: &str,
    ptr: u64,
    (batch, seq, heads, head_dim): (usize, usize, usize, usize),
) -> Result<CUtensorMap, KernelError> {
    const BF16: u64 = 2;
    let dims = [head_dim, heads, seq, batch].map(|n| n as u64);
    // Byte strides of dims 1..3 (dim 0 is contiguous); multiples of 16 as head_dim % 8 == 0.
    let strides = [
        dims[0] * BF16,
        dims[0] * dims[1] * BF16,
        dims[0] * dims[1] * dims[2] * BF16,
    ];
    let boxes = [BOX_COLS, 1, FLASH_BLOCK as u32, 1];
    let element_strides = [1u32; 4];
    let mut map = MaybeUninit::<CUtensorMap>::zeroed();
    // SAFETY: every array holds the rank's (4, or 3 for the strides) elements the driver reads;
    // `map` is writable and aligned as CUtensorMap requires; the driver only encodes, it does
    // not dereference `ptr`.
    let result = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            4,
            ptr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    result.result().map_err(|e| {
        shape(
            kernel,
            format!("TMA descriptor of {what} (batch {batch}, seq {seq}, heads {heads}, head_dim {head_dim}): {e}"),
        )
    })?;
    // SAFETY: the driver wrote the descriptor (the call succeeded).
    Ok(unsafe { map.assume_init() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_structs_match_the_kernels() {
        // FaFwdMaps / FaBwdMaps in attention.cu: 128-byte descriptors back to back; the driver
        // copies exactly the kernel's parameter size from these, so any padding or reordering
        // would hand the kernels shifted descriptors.
        assert_eq!(std::mem::size_of::<CUtensorMap>(), 128);
        assert_eq!(std::mem::size_of::<FwdMaps>(), 3 * 128);
        assert_eq!(std::mem::size_of::<BwdMaps>(), 4 * 128);
        assert_eq!(std::mem::offset_of!(BwdMaps, dout), 3 * 128);
        assert_eq!(std::mem::align_of::<FwdMaps>() % 64, 0);
    }
}
