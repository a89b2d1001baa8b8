//! NF4 launchers (`nf4.cu`): quantisation, dequantisation (whole weights or rows, plain or
//! double-quantised absmax) and the blockwise 8-bit quantisation of absmax.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, PushKernelArg};

use super::{aligned16, bf16, cfg, check_len, grid, launch, shape, Kernels, THREADS};
use crate::quant::{signed_map, unsigned_map, NF4_BLOCK, Q8_BLOCK};
use crate::KernelError;

impl Kernels {
    /// NF4-quantises bf16 weights (n % 64 == 0): packed [n/2], absmax [n/64].
    pub fn nf4_quantize(
        &self,
        stream: &CudaStream,
        w: &CudaView<bf16>,
        packed: &mut CudaViewMut<u8>,
        absmax: &mut CudaViewMut<f32>,
    ) -> Result<(), KernelError> {
        const K: &str = "nf4_quantize";
        let n = nf4_check(K, w.len(), packed.len(), absmax.len())?;
        aligned16(K, "w", w, stream)?;
        let n_i = n as i64;
        let mut a = stream.launch_builder(&self.f.nf4_quantize);
        a.arg(w).arg(&n_i).arg(packed).arg(absmax);
        // 8 warps per block, one warp per 64-value block.
        launch(
            a,
            cfg(grid(n / NF4_BLOCK, 8, self.stride_cap() * 2), (THREADS, 1)),
        )
    }

    /// Dequantises NF4 into `out` (bf16, n = out.len()), with plain fp32 absmax or with the
    /// double-quantised statistics (`dq`; `maps.signed` is their code).
    pub fn nf4_dequantize(
        &self,
        stream: &CudaStream,
        packed: &CudaView<u8>,
        absmax: Nf4Absmax<'_, '_>,
        out: &mut CudaViewMut<bf16>,
    ) -> Result<(), KernelError> {
        let n = out.len();
        self.nf4_dequantize_rows(stream, packed, absmax, (out, n, n), n)
    }

    /// [`Kernels::nf4_dequantize`] of `n` values, rows of `cols`, into `out`'s rows `ld`
    /// elements apart (`(out, cols, ld)`; both multiples of 8, `cols` of `n`).
    pub fn nf4_dequantize_rows(
        &self,
        stream: &CudaStream,
        packed: &CudaView<u8>,
        absmax: Nf4Absmax<'_, '_>,
        (out, cols, ld): (&mut CudaViewMut<bf16>, usize, usize),
        n: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "nf4_dequantize";
        if !n.is_multiple_of(NF4_BLOCK) {
            return Err(shape(
                K,
                format!("{n} values: NF4 needs a multiple of {NF4_BLOCK}"),
            ));
        }
        if cols == 0
            || !cols.is_multiple_of(8)
            || !n.is_multiple_of(cols)
            || ld < cols
            || !ld.is_multiple_of(8)
        {
            return Err(shape(
                K,
                format!("rows of {cols} values {ld} apart: both need to be multiples of 8, {cols} of {n}, and {ld} ≥ {cols}"),
            ));
        }
        let rows = n / cols;
        let groups_out = ((rows - 1) * ld + cols) / 8;
        if u32::try_from(groups_out).is_err() {
            return Err(shape(
                K,
                format!("{n} values exceed the kernel's 32-bit indexing"),
            ));
        }
        check_len(K, "out", out.len(), (rows - 1) * ld + cols)?;
        check_len(K, "packed", packed.len(), n / 2)?;
        aligned16(K, "out", &*out, stream)?;
        aligned16(K, "packed", packed, stream)?;
        let (n_i, cols8, ld8) = (n as i64, (cols / 8) as u32, (ld / 8) as u32);
        let config = cfg(
            grid(n / 8, THREADS as usize, self.stride_cap() * 2),
            (THREADS, 1),
        );
        match absmax {
            Nf4Absmax::Plain(absmax) => {
                check_len(K, "absmax", absmax.len(), n / NF4_BLOCK)?;
                let mut a = stream.launch_builder(&self.f.nf4_dequantize);
                a.arg(packed)
                    .arg(absmax)
                    .arg(&n_i)
                    .arg(&cols8)
                    .arg(&ld8)
                    .arg(out);
                launch(a, config)
            }
            Nf4Absmax::Double(dq, maps) => {
                let blocks = n / NF4_BLOCK;
                check_len(K, "qabsmax", dq.qabsmax.len(), blocks)?;
                check_len(K, "absmax2", dq.absmax2.len(), blocks.div_ceil(Q8_BLOCK))?;
                check_len(K, "offset", dq.offset.len(), 1)?;
                let mut a = stream.launch_builder(&self.f.nf4_dequantize_dq);
                a.arg(packed)
                    .arg(&dq.qabsmax)
                    .arg(&dq.absmax2)
                    .arg(&maps.signed);
                a.arg(&dq.offset).arg(&n_i).arg(&cols8).arg(&ld8).arg(out);
                launch(a, config)
            }
        }
    }

    /// Double quantisation of NF4 absmax values: offset[0] = mean(absmax), then 8-bit
    /// blockwise codes of absmax - offset with the signed map (`qabsmax`, `absmax2`).
    #[allow(clippy::too_many_arguments)]
    pub fn nf4_double_quantize(
        &self,
        stream: &CudaStream,
        absmax: &CudaView<f32>,
        maps: &QuantMaps,
        partials: &mut CudaViewMut<f32>,
        offset: &mut CudaViewMut<f32>,
        qabsmax: &mut CudaViewMut<u8>,
        absmax2: &mut CudaViewMut<f32>,
    ) -> Result<(), KernelError> {
        const K: &str = "quantize_blockwise_8bit";
        let n = absmax.len();
        check_len(K, "qabsmax", qabsmax.len(), n)?;
        check_len(K, "absmax2", absmax2.len(), n.div_ceil(Q8_BLOCK))?;
        self.sum(stream, absmax, 1.0 / n.max(1) as f32, partials, offset)?;
        let n_i = n as i64;
        let mut a = stream.launch_builder(&self.f.quantize_blockwise_8bit);
        a.arg(absmax)
            .arg(&n_i)
            .arg(&mut *offset)
            .arg(&maps.signed)
            .arg(qabsmax)
            .arg(absmax2);
        launch(
            a,
            cfg(grid(n, Q8_BLOCK, self.stride_cap()), (Q8_BLOCK as u32, 1)),
        )
    }
}

/// The dynamic quantisation maps on the device (8-bit Adam states, double-quantised absmax).
pub struct QuantMaps {
    pub signed: CudaSlice<f32>,
    pub unsigned: CudaSlice<f32>,
}

impl QuantMaps {
    pub fn upload(stream: &Arc<CudaStream>) -> Result<Self, KernelError> {
        Ok(Self {
            signed: stream.clone_htod(signed_map().as_slice())?,
            unsigned: stream.clone_htod(unsigned_map().as_slice())?,
        })
    }
}

/// Double-quantised NF4 statistics (bitsandbytes `compress_statistics=True`).
pub struct Nf4DoubleQuant<'a> {
    /// One byte per 64-value block.
    pub qabsmax: CudaView<'a, u8>,
    /// One fp32 per 256 blocks.
    pub absmax2: CudaView<'a, f32>,
    /// Device scalar: the mean that was subtracted before quantising.
    pub offset: CudaView<'a, f32>,
}

/// How NF4 absmax values are stored.
pub enum Nf4Absmax<'a, 'b> {
    Plain(&'a CudaView<'b, f32>),
    Double(&'a Nf4DoubleQuant<'b>, &'a QuantMaps),
}

fn nf4_check(
    kernel: &'static str,
    n: usize,
    packed: usize,
    absmax: usize,
) -> Result<usize, KernelError> {
    if !n.is_multiple_of(NF4_BLOCK) {
        return Err(shape(
            kernel,
            format!("{n} values: NF4 needs a multiple of {NF4_BLOCK}"),
        ));
    }
    check_len(kernel, "packed", packed, n / 2)?;
    check_len(kernel, "absmax", absmax, n / NF4_BLOCK)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_contract_rejects_what_the_kernels_cannot_read() {
        assert_eq!(nf4_check("t", 128, 64, 2).unwrap(), 128);
        assert!(nf4_check("t", 96, 48, 2).is_err());
        assert!(nf4_check("t", 128, 63, 2).is_err());
    }
}
