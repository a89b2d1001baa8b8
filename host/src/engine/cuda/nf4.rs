//! QLoRA base weights (`--load_in_4bit`): each projection weight is NF4-quantised on the GPU at
//! load time with bitsandbytes' semantics (blocks of 64, absmax double-quantised: 8-bit codes
//! in blocks of 256 with the mean subtracted), and the bf16 copy is freed at once. A GEMM that
//! reads the weight first dequantises it into one bf16 buffer shared by every projection, so
//! the resident base weights cost ~0.52 bytes per parameter plus that one buffer.

use std::mem::ManuallyDrop;
use std::sync::Arc;

use anyhow::{ensure, Result};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use ferrotune_kernels::device::{
    bf16, Kernels, Nf4Absmax, Nf4DoubleQuant, QuantMaps, REDUCE_PARTS,
};
use ferrotune_kernels::quant::{NF4_BLOCK, Q8_BLOCK};

use super::raw::Borrowed;

/// One weight matrix in NF4 with double-quantised absmax.
pub struct Nf4Weight {
    pub numel: usize,
    /// Two 4-bit codes per byte `[numel/2]`.
    pub packed: CudaSlice<u8>,
    /// 8-bit code of each 64-value block's absmax `[numel/64]`.
    pub qabsmax: CudaSlice<u8>,
    /// fp32 scale per 256 absmax codes.
    pub absmax2: CudaSlice<f32>,
    /// The mean subtracted from the absmax values before coding (device scalar).
    pub offset: CudaSlice<f32>,
}

/// Device addresses of an [`Nf4Weight`] (what a [`super::linear::Linear`] carries).
#[derive(Debug, Clone, Copy)]
pub struct Nf4Ptrs {
    pub numel: usize,
    pub packed: u64,
    pub qabsmax: u64,
    pub absmax2: u64,
    pub offset: u64,
    /// The signed dynamic map (the absmax codes' code book).
    pub code2: u64,
}

/// What quantisation needs besides the weight: the maps and reduction scratch.
pub struct Nf4Quantizer {
    pub maps: QuantMaps,
    partials: CudaSlice<f32>,
}

impl Nf4Quantizer {
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        Ok(Nf4Quantizer {
            maps: QuantMaps::upload(stream)?,
            partials: stream.alloc_zeros(REDUCE_PARTS)?,
        })
    }

    /// Quantises `w` (consumed: its memory is released once the stream has quantised it).
    pub fn quantize(
        &mut self,
        stream: &Arc<CudaStream>,
        kernels: &Kernels,
        w: CudaSlice<bf16>,
        name: &str,
    ) -> Result<Nf4Weight> {
        let n = w.len();
        ensure!(
            n.is_multiple_of(NF4_BLOCK),
            "--load_in_4bit: {name} has {n} values, not a multiple of the NF4 block ({NF4_BLOCK})"
        );
        let blocks = n / NF4_BLOCK;
        let mut packed = stream.alloc_zeros::<u8>(n / 2)?;
        let mut absmax = stream.alloc_zeros::<f32>(blocks)?;
        kernels.nf4_quantize(
            stream,
            &w.slice(..),
            &mut packed.slice_mut(..),
            &mut absmax.slice_mut(..),
        )?;
        // Freed in stream order (cudarc frees asynchronously on the owning stream).
        drop(w);
        let mut qabsmax = stream.alloc_zeros::<u8>(blocks)?;
        let mut absmax2 = stream.alloc_zeros::<f32>(blocks.div_ceil(Q8_BLOCK))?;
        let mut offset = stream.alloc_zeros::<f32>(1)?;
        kernels.nf4_double_quantize(
            stream,
            &absmax.slice(..),
            &self.maps,
            &mut self.partials.slice_mut(..),
            &mut offset.slice_mut(..),
            &mut qabsmax.slice_mut(..),
            &mut absmax2.slice_mut(..),
        )?;
        drop(absmax);
        Ok(Nf4Weight {
            numel: n,
            packed,
            qabsmax,
            absmax2,
            offset,
        })
    }
}

impl Nf4Weight {
    pub fn ptrs(&self, stream: &CudaStream, maps: &QuantMaps) -> Nf4Ptrs {
        Nf4Ptrs {
            numel: self.numel,
            packed: self.packed.device_ptr(stream).0,
            qabsmax: self.qabsmax.device_ptr(stream).0,
            absmax2: self.absmax2.device_ptr(stream).0,
            offset: self.offset.device_ptr(stream).0,
            code2: maps.signed.device_ptr(stream).0,
        }
    }
}

impl Nf4Ptrs {
    /// Dequantises into the bf16 buffer at `out` (`numel` values).
    pub fn dequantize(&self, stream: &Arc<CudaStream>, kernels: &Kernels, out: u64) -> Result<()> {
        let n = self.numel;
        let blocks = n / NF4_BLOCK;
        // SAFETY: every pointer comes from a live `Nf4Weight` (owned by the backend for its whole
        // life) or the shared dequantisation buffer sized for the largest projection; all on
        // this stream, so no launch races with another.
        unsafe {
            let packed = Borrowed::<u8>::new(stream, self.packed, n / 2);
            let qabsmax = Borrowed::<u8>::new(stream, self.qabsmax, blocks);
            let absmax2 = Borrowed::<f32>::new(stream, self.absmax2, blocks.div_ceil(Q8_BLOCK));
            let offset = Borrowed::<f32>::new(stream, self.offset, 1);
            let mut w = Borrowed::<bf16>::new(stream, out, n);
            let maps = BorrowedMaps::new(stream, self.code2);
            let dq = Nf4DoubleQuant {
                qabsmax: qabsmax.view(),
                absmax2: absmax2.view(),
                offset: offset.view(),
            };
            kernels.nf4_dequantize(
                stream,
                &packed.view(),
                Nf4Absmax::Double(&dq, &maps.maps),
                &mut w.view_mut(),
            )?;
        }
        Ok(())
    }
}

/// A [`QuantMaps`] over a signed map owned elsewhere (the dequantiser reads only `signed`).
struct BorrowedMaps {
    maps: ManuallyDrop<QuantMaps>,
}

impl BorrowedMaps {
    /// # Safety
    /// `signed` must address the 256-value signed map for as long as this lives.
    unsafe fn new(stream: &Arc<CudaStream>, signed: u64) -> Self {
        BorrowedMaps {
            maps: ManuallyDrop::new(QuantMaps {
                signed: stream.upgrade_device_ptr(signed, 256),
                unsigned: stream.upgrade_device_ptr(signed, 256),
            }),
        }
    }
}

impl Drop for BorrowedMaps {
    fn drop(&mut self) {
        // SAFETY: taken once; `leak` gives the pointers up without freeing them.
        let maps = unsafe { ManuallyDrop::take(&mut self.maps) };
        let _ = maps.signed.leak();
        let _ = maps.unsigned.leak();
    }
}
