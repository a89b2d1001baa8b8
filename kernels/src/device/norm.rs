//! RMSNorm forward and backward launchers (`rmsnorm.cu`): one row per block, held in registers.

use cudarc::driver::{CudaStream, CudaView, CudaViewMut, PushKernelArg};

use super::{aligned16, bf16, cfg, check_len, launch, shape, to_i32, Kernels, RMS_VECS};
use crate::KernelError;

impl Kernels {
    /// RMSNorm forward: y = x * rstd * w over rows of `dim`, into rows of `y` that are `y.1`
    /// (≥ dim, a multiple of 8) elements apart; rstd [rows] saved for backward.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_fwd(
        &self,
        stream: &CudaStream,
        x: &CudaView<bf16>,
        w: &CudaView<bf16>,
        (y, y_ld): (&mut CudaViewMut<bf16>, usize),
        rstd: &mut CudaViewMut<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(), KernelError> {
        const K: &str = "rmsnorm_fwd";
        if rows == 0 {
            return Ok(());
        }
        let (threads, rows_i, dim_i, ld_i) =
            rms_rows(K, rows, dim, ("y", y.len(), y_ld), (w.len(), rstd.len()))?;
        check_len(K, "x", x.len(), rows * dim)?;
        aligned16(K, "x", x, stream)?;
        aligned16(K, "w", w, stream)?;
        aligned16(K, "y", y, stream)?;
        let mut a = stream.launch_builder(&self.f.rmsnorm_fwd);
        a.arg(x)
            .arg(w)
            .arg(y)
            .arg(rstd)
            .arg(&rows_i)
            .arg(&dim_i)
            .arg(&ld_i)
            .arg(&eps);
        launch(a, cfg(rows as u32, (threads, 1)))
    }

    /// RMSNorm input gradient into rows of `dx` that are `dx.1` (≥ dim, a multiple of 8)
    /// elements apart. With `accumulate`, dx += result (the residual's gradient).
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_bwd(
        &self,
        stream: &CudaStream,
        x: &CudaView<bf16>,
        w: &CudaView<bf16>,
        rstd: &CudaView<f32>,
        dy: &CudaView<bf16>,
        (dx, dx_ld): (&mut CudaViewMut<bf16>, usize),
        rows: usize,
        dim: usize,
        accumulate: bool,
    ) -> Result<(), KernelError> {
        const K: &str = "rmsnorm_bwd";
        if rows == 0 {
            return Ok(());
        }
        let (threads, rows_i, dim_i, ld_i) =
            rms_rows(K, rows, dim, ("dx", dx.len(), dx_ld), (w.len(), rstd.len()))?;
        for (what, len) in [("x", x.len()), ("dy", dy.len())] {
            check_len(K, what, len, rows * dim)?;
        }
        aligned16(K, "x", x, stream)?;
        aligned16(K, "w", w, stream)?;
        aligned16(K, "dy", dy, stream)?;
        aligned16(K, "dx", dx, stream)?;
        let acc = accumulate as i32;
        let mut a = stream.launch_builder(&self.f.rmsnorm_bwd);
        a.arg(x)
            .arg(w)
            .arg(rstd)
            .arg(dy)
            .arg(dx)
            .arg(&rows_i)
            .arg(&dim_i)
            .arg(&ld_i)
            .arg(&acc);
        launch(a, cfg(rows as u32, (threads, 1)))
    }
}

/// What both RMSNorm launchers check about their shape — `dim`, the output's row stride `ld`
/// (≥ dim, a multiple of 8) and length, the weight's and rstd's lengths `(w, rstd)` — and the
/// launch's block size and integer arguments `(threads, rows, dim, ld)`.
fn rms_rows(
    kernel: &'static str,
    rows: usize,
    dim: usize,
    (out, out_len, ld): (&str, usize, usize),
    (w_len, rstd_len): (usize, usize),
) -> Result<(u32, i32, i32, i32), KernelError> {
    let threads = rms_threads(kernel, dim)?;
    if ld < dim || !ld.is_multiple_of(8) {
        return Err(shape(
            kernel,
            format!("{out}'s row stride {ld} must be a multiple of 8 and at least dim {dim}"),
        ));
    }
    check_len(kernel, out, out_len, (rows - 1) * ld + dim)?;
    check_len(kernel, "w", w_len, dim)?;
    check_len(kernel, "rstd", rstd_len, rows)?;
    Ok((
        threads,
        to_i32(kernel, "rows", rows)?,
        to_i32(kernel, "dim", dim)?,
        to_i32(kernel, "row stride", ld)?,
    ))
}

fn rms_threads(kernel: &'static str, dim: usize) -> Result<u32, KernelError> {
    if dim == 0 || !dim.is_multiple_of(8) || dim > 8 * RMS_VECS * 1024 {
        return Err(shape(
            kernel,
            format!(
                "dim {dim} must be a positive multiple of 8, at most {}",
                8 * RMS_VECS * 1024
            ),
        ));
    }
    let per_thread = (dim / 8).div_ceil(RMS_VECS);
    Ok((per_thread.div_ceil(32) * 32).clamp(32, 1024) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rmsnorm_block_holds_the_row_in_registers() {
        // 4096 = 512 vectors = 4 per thread over 128 threads.
        assert_eq!(rms_threads("t", 4096).unwrap(), 128);
        assert_eq!(rms_threads("t", 128).unwrap(), 32);
        assert_eq!(rms_threads("t", 32768).unwrap(), 1024);
        for bad in [0, 12, 32776] {
            assert!(rms_threads("t", bad).is_err(), "{bad}");
        }
    }
}
