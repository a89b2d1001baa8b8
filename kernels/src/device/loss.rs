//! Chunked cross-entropy launchers (`cross_entropy.cu`): per-row statistics over vocabulary
//! chunks, then the gradient written over the logits.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, PushKernelArg};

use super::{bf16, cfg, check_len, launch, shape, strided_len, to_i32, Kernels, THREADS};
use crate::KernelError;

impl Kernels {
    /// Folds one vocabulary chunk of bf16 logits (`rows` rows, row stride `ld`, vocab ids
    /// v0..v0+vc) into the running row statistics; `first` starts them, `last` writes lse and
    /// loss. `targets` are vocab ids or -100.
    #[allow(clippy::too_many_arguments)]
    pub fn ce_stats(
        &self,
        stream: &CudaStream,
        logits: &CudaView<bf16>,
        ld: usize,
        rows: usize,
        v0: usize,
        vc: usize,
        targets: &CudaView<i32>,
        stats: &mut CrossEntropyRows,
        first: bool,
        last: bool,
    ) -> Result<(), KernelError> {
        const K: &str = "ce_stats";
        if rows == 0 {
            return Ok(());
        }
        ce_check(K, logits.len(), ld, rows, vc, targets.len())?;
        check_len(K, "row statistics", stats.rows(), rows)?;
        let (ld_i, r_i) = (ld as i64, to_i32(K, "rows", rows)?);
        let (v0_i, vc_i) = (to_i32(K, "v0", v0)?, to_i32(K, "vc", vc)?);
        let (first_i, last_i) = (first as i32, last as i32);
        let mut a = stream.launch_builder(&self.f.ce_stats);
        a.arg(logits)
            .arg(&ld_i)
            .arg(&r_i)
            .arg(&v0_i)
            .arg(&vc_i)
            .arg(targets);
        a.arg(&mut stats.run_max)
            .arg(&mut stats.run_sum)
            .arg(&mut stats.target_logit);
        a.arg(&mut stats.lse)
            .arg(&mut stats.loss)
            .arg(&first_i)
            .arg(&last_i);
        launch(a, cfg(rows as u32, (THREADS, 1)))
    }

    /// Overwrites a logits chunk with dL/dlogits = (softmax - onehot) * scale (after the last
    /// ce_stats of these rows).
    #[allow(clippy::too_many_arguments)]
    pub fn ce_grad(
        &self,
        stream: &CudaStream,
        logits: &mut CudaViewMut<bf16>,
        ld: usize,
        rows: usize,
        v0: usize,
        vc: usize,
        targets: &CudaView<i32>,
        lse: &CudaView<f32>,
        scale: f32,
    ) -> Result<(), KernelError> {
        const K: &str = "ce_grad";
        if rows == 0 {
            return Ok(());
        }
        ce_check(K, logits.len(), ld, rows, vc, targets.len())?;
        check_len(K, "lse", lse.len(), rows)?;
        let (ld_i, r_i) = (ld as i64, to_i32(K, "rows", rows)?);
        let (v0_i, vc_i) = (to_i32(K, "v0", v0)?, to_i32(K, "vc", vc)?);
        let mut a = stream.launch_builder(&self.f.ce_grad);
        a.arg(logits)
            .arg(&ld_i)
            .arg(&r_i)
            .arg(&v0_i)
            .arg(&vc_i)
            .arg(targets)
            .arg(lse)
            .arg(&scale);
        launch(a, cfg(rows as u32, (THREADS, 1)))
    }
}

/// Per-row workspace of the chunked cross-entropy ([`Kernels::ce_stats`]), sized for the
/// largest row count once.
pub struct CrossEntropyRows {
    pub run_max: CudaSlice<f32>,
    pub run_sum: CudaSlice<f32>,
    pub target_logit: CudaSlice<f32>,
    /// logsumexp per row, written by the last chunk's ce_stats.
    pub lse: CudaSlice<f32>,
    /// Loss per row (0 where ignored), written by the last chunk's ce_stats.
    pub loss: CudaSlice<f32>,
}

impl CrossEntropyRows {
    pub fn new(stream: &Arc<CudaStream>, rows: usize) -> Result<Self, KernelError> {
        Ok(Self {
            run_max: stream.alloc_zeros(rows)?,
            run_sum: stream.alloc_zeros(rows)?,
            target_logit: stream.alloc_zeros(rows)?,
            lse: stream.alloc_zeros(rows)?,
            loss: stream.alloc_zeros(rows)?,
        })
    }

    fn rows(&self) -> usize {
        self.lse.len()
    }
}

fn ce_check(
    kernel: &'static str,
    logits: usize,
    ld: usize,
    rows: usize,
    vc: usize,
    targets: usize,
) -> Result<(), KernelError> {
    if vc == 0 || ld < vc {
        return Err(shape(
            kernel,
            format!("chunk width {vc} must be positive and <= row stride {ld}"),
        ));
    }
    check_len(kernel, "targets", targets, rows)?;
    check_len(kernel, "logits", logits, strided_len(rows, ld, vc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_contract_rejects_what_the_kernels_cannot_read() {
        assert!(ce_check("t", 3 * 10 + 4, 10, 4, 4, 4).is_ok());
        assert!(ce_check("t", 3 * 10 + 3, 10, 4, 4, 4).is_err());
        assert!(ce_check("t", 100, 10, 4, 11, 4).is_err());
        assert!(ce_check("t", 100, 10, 4, 4, 3).is_err());
    }
}
