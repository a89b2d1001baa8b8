//! Optimizer and reduction launchers (`adamw.cu`, `reduce.cu`): AdamW (fp32 and 8-bit states),
//! sums, the global gradient norm, and adding a stacked gradient's blocks into their tensors.

use cudarc::driver::{CudaStream, CudaView, CudaViewMut, LaunchArgs, LaunchConfig, PushKernelArg};

use super::nf4::QuantMaps;
use super::{
    aligned16, bf16, cfg, check_len, grid, launch, shape, Kernels, NULL_PTR, REDUCE_PARTS, THREADS,
};
use crate::quant::Q8_BLOCK;
use crate::reference::adamw::{AdamMode, AdamStep};
use crate::KernelError;

impl Kernels {
    /// One AdamW step over a flat fp32 arena (torch or bitsandbytes order, per `step.mode`).
    /// `clip` is the device scalar from [`Kernels::grad_norm`] or None; `shadow`, when given,
    /// receives the updated parameters in bf16 (the copy the GEMMs read).
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_fp32(
        &self,
        stream: &CudaStream,
        params: &mut CudaViewMut<f32>,
        grads: &CudaView<f32>,
        m: &mut CudaViewMut<f32>,
        v: &mut CudaViewMut<f32>,
        step: &AdamStep,
        clip: Option<&CudaView<f32>>,
        shadow: Option<&mut CudaViewMut<bf16>>,
    ) -> Result<(), KernelError> {
        const K: &str = "adamw_fp32";
        let n = params.len();
        for (what, len) in [("grads", grads.len()), ("m", m.len()), ("v", v.len())] {
            check_len(K, what, len, n)?;
        }
        let n_i = n as i64;
        let mode = step.mode as i32;
        let mut a = stream.launch_builder(&self.f.adamw_fp32);
        a.arg(params).arg(grads).arg(m).arg(v).arg(&n_i);
        a.arg(&step.beta1)
            .arg(&step.beta2)
            .arg(&step.step_size)
            .arg(&step.bc2_sqrt);
        a.arg(&step.eps).arg(&step.decay).arg(&mode);
        push_opt(&mut a, clip);
        push_shadow(K, &mut a, shadow, n)?;
        launch(
            a,
            cfg(grid(n, THREADS as usize, self.stride_cap()), (THREADS, 1)),
        )
    }

    /// One bitsandbytes AdamW8bit step over a flat fp32 arena whose tensors start at multiples
    /// of 256 values.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_8bit(
        &self,
        stream: &CudaStream,
        params: &mut CudaViewMut<f32>,
        grads: &CudaView<f32>,
        states: &mut Adam8bitStates<'_>,
        maps: &QuantMaps,
        step: &AdamStep,
        clip: Option<&CudaView<f32>>,
        shadow: Option<&mut CudaViewMut<bf16>>,
    ) -> Result<(), KernelError> {
        const K: &str = "adamw_8bit";
        if step.mode != AdamMode::Bitsandbytes {
            return Err(shape(K, "8-bit states follow bitsandbytes' update order: build the step with AdamStep::bitsandbytes"));
        }
        let n = params.len();
        let blocks = n.div_ceil(Q8_BLOCK);
        check_len(K, "grads", grads.len(), n)?;
        check_len(K, "m_codes", states.m_codes.len(), n)?;
        check_len(K, "v_codes", states.v_codes.len(), n)?;
        check_len(K, "m_absmax", states.m_absmax.len(), blocks)?;
        check_len(K, "v_absmax", states.v_absmax.len(), blocks)?;
        // 16-byte vectors of p and g, 8-byte vectors of codes at multiples of 8 values.
        aligned16(K, "params", &*params, stream)?;
        aligned16(K, "grads", grads, stream)?;
        aligned16(K, "m_codes", &states.m_codes, stream)?;
        aligned16(K, "v_codes", &states.v_codes, stream)?;
        if let Some(s) = &shadow {
            aligned16(K, "shadow", &**s, stream)?;
        }
        let n_i = n as i64;
        let mut a = stream.launch_builder(&self.f.adamw_8bit);
        a.arg(params)
            .arg(grads)
            .arg(&mut states.m_codes)
            .arg(&mut states.m_absmax);
        a.arg(&mut states.v_codes)
            .arg(&mut states.v_absmax)
            .arg(&maps.signed)
            .arg(&maps.unsigned);
        a.arg(&n_i)
            .arg(&step.beta1)
            .arg(&step.beta2)
            .arg(&step.step_size)
            .arg(&step.eps);
        a.arg(&step.decay);
        push_opt(&mut a, clip);
        push_shadow(K, &mut a, shadow, n)?;
        // One warp per quantisation block, 8 warps per CUDA block.
        launch(a, cfg(grid(blocks, 8, self.stride_cap()), (THREADS, 1)))
    }

    fn reduce_partial(
        &self,
        stream: &CudaStream,
        x: &CudaView<f32>,
        square: bool,
        partials: &mut CudaViewMut<f32>,
    ) -> Result<i32, KernelError> {
        const K: &str = "reduce_partial";
        if partials.is_empty() {
            return Err(shape(K, "partials buffer is empty"));
        }
        let parts = grid(
            x.len(),
            THREADS as usize,
            (partials.len().min(REDUCE_PARTS)) as u32,
        );
        let n_i = x.len() as i64;
        let sq = square as i32;
        let mut a = stream.launch_builder(&self.f.reduce_partial);
        a.arg(x).arg(&n_i).arg(&sq).arg(partials);
        launch(a, cfg(parts, (THREADS, 1)))?;
        Ok(parts as i32)
    }

    /// out[0] = scale * sum(x), deterministic; `partials` is scratch (≤ REDUCE_PARTS used).
    pub fn sum(
        &self,
        stream: &CudaStream,
        x: &CudaView<f32>,
        scale: f32,
        partials: &mut CudaViewMut<f32>,
        out: &mut CudaViewMut<f32>,
    ) -> Result<(), KernelError> {
        check_len("reduce_final", "out", out.len(), 1)?;
        let parts = self.reduce_partial(stream, x, false, partials)?;
        let mut a = stream.launch_builder(&self.f.reduce_final);
        a.arg(&mut *partials).arg(&parts).arg(&scale).arg(out);
        launch(a, cfg(1, (32, 1)))
    }

    /// Global L2 norm of `grads` into norm[0] and torch's clip coefficient into coef[0]
    /// (min(1, max_norm/(norm+1e-6)); 1 when max_norm <= 0), all on the device.
    pub fn grad_norm(
        &self,
        stream: &CudaStream,
        grads: &CudaView<f32>,
        max_norm: f32,
        partials: &mut CudaViewMut<f32>,
        norm: &mut CudaViewMut<f32>,
        coef: &mut CudaViewMut<f32>,
    ) -> Result<(), KernelError> {
        check_len("grad_norm_final", "norm", norm.len(), 1)?;
        check_len("grad_norm_final", "coef", coef.len(), 1)?;
        let parts = self.reduce_partial(stream, grads, true, partials)?;
        let mut a = stream.launch_builder(&self.f.grad_norm_final);
        a.arg(&mut *partials)
            .arg(&parts)
            .arg(&max_norm)
            .arg(norm)
            .arg(coef);
        launch(a, cfg(1, (32, 1)))
    }

    /// `dsts[p] += src[p·n..(p+1)·n]` for each of the (one to three) destinations, `n` values
    /// each: one launch for the blocks of a stacked product.
    pub fn add_blocks_f32(
        &self,
        stream: &CudaStream,
        src: &CudaView<f32>,
        dsts: &mut [CudaViewMut<f32>],
    ) -> Result<(), KernelError> {
        const K: &str = "add_blocks_f32";
        let parts = dsts.len();
        if !(1..=3).contains(&parts) {
            return Err(shape(K, format!("{parts} destinations, 1 to 3 per launch")));
        }
        let n = dsts[0].len();
        if dsts.iter().any(|d| d.len() != n) {
            return Err(shape(K, "destinations of different lengths".to_string()));
        }
        check_len(K, "src", src.len(), parts * n)?;
        if n == 0 {
            return Ok(());
        }
        let n_i = n as i64;
        let mut a = stream.launch_builder(&self.f.add_blocks_f32);
        a.arg(src).arg(&n_i);
        for d in dsts.iter_mut() {
            a.arg(d);
        }
        // Unused destinations are null: the grid's rows stop at `parts`.
        let null: u64 = 0;
        for _ in parts..3 {
            a.arg(&null);
        }
        let x = grid(n, THREADS as usize, self.stride_cap());
        launch(
            a,
            LaunchConfig {
                grid_dim: (x, parts as u32, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
        )
    }
}

/// 8-bit blockwise Adam states of a flat parameter arena (bitsandbytes layout).
pub struct Adam8bitStates<'a> {
    pub m_codes: CudaViewMut<'a, u8>,
    pub m_absmax: CudaViewMut<'a, f32>,
    pub v_codes: CudaViewMut<'a, u8>,
    pub v_absmax: CudaViewMut<'a, f32>,
}

fn push_shadow<'a>(
    kernel: &'static str,
    a: &mut LaunchArgs<'a>,
    shadow: Option<&'a mut CudaViewMut<'_, bf16>>,
    n: usize,
) -> Result<(), KernelError> {
    match shadow {
        Some(s) => {
            check_len(kernel, "shadow", s.len(), n)?;
            a.arg(s);
        }
        None => {
            a.arg(&NULL_PTR);
        }
    }
    Ok(())
}

fn push_opt<'a>(a: &mut LaunchArgs<'a>, v: Option<&'a CudaView<'_, f32>>) {
    match v {
        Some(v) => a.arg(v),
        None => a.arg(&NULL_PTR),
    };
}
