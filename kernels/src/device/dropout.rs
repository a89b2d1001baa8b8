//! The LoRA dropout launcher (`dropout.cu`): the adapter input's mask drawn from a
//! counter-based hash.

use cudarc::driver::{CudaStream, CudaView, CudaViewMut, PushKernelArg};

use super::{aligned16, bf16, cfg, check_len, grid, launch, shape, Kernels, THREADS};
use crate::KernelError;

impl Kernels {
    /// LoRA dropout with a regenerable mask: out = (accumulate ? out : 0) + mask ⊙ x / (1-p),
    /// mask from (seed, index) only — the backward calls it again with the same seed on the
    /// gradient. `threshold`/`scale` from [`crate::reference::dropout::dropout_params`].
    #[allow(clippy::too_many_arguments)]
    pub fn dropout_apply(
        &self,
        stream: &CudaStream,
        x: &CudaView<bf16>,
        out: &mut CudaViewMut<bf16>,
        threshold: u32,
        scale: f32,
        seed: u64,
        accumulate: bool,
    ) -> Result<(), KernelError> {
        const K: &str = "dropout_apply";
        let n = x.len();
        if !n.is_multiple_of(8) {
            return Err(shape(K, format!("{n} values: needs a multiple of 8")));
        }
        check_len(K, "out", out.len(), n)?;
        aligned16(K, "x", x, stream)?;
        aligned16(K, "out", &*out, stream)?;
        let (n_i, acc) = (n as i64, accumulate as i32);
        let mut a = stream.launch_builder(&self.f.dropout_apply);
        a.arg(x)
            .arg(out)
            .arg(&n_i)
            .arg(&threshold)
            .arg(&scale)
            .arg(&seed)
            .arg(&acc);
        launch(
            a,
            cfg(
                grid(n / 8, THREADS as usize, self.stride_cap()),
                (THREADS, 1),
            ),
        )
    }
}
