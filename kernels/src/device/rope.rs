//! RoPE launchers (`rope.cu`): the cos/sin tables from positions, and the rotation of q/k (or its
//! inverse on their gradients) in place.

use cudarc::driver::{CudaStream, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::{bf16, cfg, check_len, grid, launch, shape, to_i32, Kernels, NULL_PTR, THREADS};
use crate::KernelError;

impl Kernels {
    /// cos/sin tables [tokens, inv_freq.len()] for per-token positions.
    pub fn rope_cos_sin(
        &self,
        stream: &CudaStream,
        positions: &CudaView<u32>,
        inv_freq: &CudaView<f32>,
        cos: &mut CudaViewMut<f32>,
        sin: &mut CudaViewMut<f32>,
    ) -> Result<(), KernelError> {
        const K: &str = "rope_cos_sin";
        let (tokens, half) = (positions.len(), inv_freq.len());
        check_len(K, "cos", cos.len(), tokens * half)?;
        check_len(K, "sin", sin.len(), tokens * half)?;
        let n = tokens * half;
        to_i32(K, "tokens * head_dim/2", n)?;
        let (t_i, h_i) = (tokens as i32, half as i32);
        let mut a = stream.launch_builder(&self.f.rope_cos_sin);
        a.arg(positions)
            .arg(inv_freq)
            .arg(cos)
            .arg(sin)
            .arg(&t_i)
            .arg(&h_i);
        launch(a, cfg(grid(n, THREADS as usize, u32::MAX), (THREADS, 1)))
    }

    /// Rotates q (`hq` heads per token, row stride `q_stride`) and k in place;
    /// `inverse` applies the transpose rotation (the backward pass on dq/dk).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_apply(
        &self,
        stream: &CudaStream,
        q: &mut CudaViewMut<bf16>,
        q_stride: usize,
        hq: usize,
        k: Option<(&mut CudaViewMut<bf16>, usize, usize)>,
        cos: &CudaView<f32>,
        sin: &CudaView<f32>,
        tokens: usize,
        head_dim: usize,
        inverse: bool,
    ) -> Result<(), KernelError> {
        const K: &str = "rope_apply";
        let config = rope_blocks(K, (cos, sin), tokens, head_dim)?;
        let need = |stride: usize, heads: usize| {
            if tokens == 0 {
                0
            } else {
                (tokens - 1) * stride + heads * head_dim
            }
        };
        if !q_stride.is_multiple_of(2) || q_stride < hq * head_dim {
            return Err(shape(
                K,
                format!("q_stride {q_stride} must be even and hold {hq} heads"),
            ));
        }
        check_len(K, "q", q.len(), need(q_stride, hq))?;
        let dir: f32 = if inverse { -1.0 } else { 1.0 };
        let (q_stride_i, hq_i) = (to_i32(K, "q_stride", q_stride)?, to_i32(K, "hq", hq)?);
        let (t_i, d_i) = (to_i32(K, "tokens", tokens)?, head_dim as i32);
        let mut a = stream.launch_builder(&self.f.rope_apply);
        a.arg(q).arg(&q_stride_i).arg(&hq_i);
        let (k_stride_i, hk_i);
        match k {
            Some((k, k_stride, hk)) => {
                if !k_stride.is_multiple_of(2) || k_stride < hk * head_dim {
                    return Err(shape(
                        K,
                        format!("k_stride {k_stride} must be even and hold {hk} heads"),
                    ));
                }
                check_len(K, "k", k.len(), need(k_stride, hk))?;
                k_stride_i = to_i32(K, "k_stride", k_stride)?;
                hk_i = to_i32(K, "hk", hk)?;
                a.arg(k);
            }
            None => {
                k_stride_i = 0;
                hk_i = 0;
                a.arg(&NULL_PTR);
            }
        }
        a.arg(&k_stride_i)
            .arg(&hk_i)
            .arg(cos)
            .arg(sin)
            .arg(&t_i)
            .arg(&d_i)
            .arg(&dir);
        launch(a, config)
    }

    /// The attention backward's dQ conversion with the inverse rotation folded in
    /// (`rope_dq_convert`): `dq = R⁻¹·(scale·dq_acc)` and `dk` rotated back in place, for the
    /// token-major `[tokens, heads·head_dim]` layouts of [`super::FlashShape`]. Run by
    /// [`Kernels::flash_attn_bwd`], which has checked the q/k lengths and alignment.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rope_dq_convert(
        &self,
        stream: &CudaStream,
        s: &super::FlashShape,
        dq_acc: &CudaView<f32>,
        dq: &mut CudaViewMut<bf16>,
        dk: &mut CudaViewMut<bf16>,
        (cos, sin): (&CudaView<f32>, &CudaView<f32>),
        scale: f32,
    ) -> Result<(), KernelError> {
        const K: &str = "flash_attn_bwd";
        let tokens = s.batch * s.seq;
        let d = s.head_dim;
        let config = rope_blocks(K, (cos, sin), tokens, d)?;
        let (hq_i, hk_i) = (
            to_i32(K, "heads", s.heads)?,
            to_i32(K, "kv_heads", s.kv_heads)?,
        );
        let (t_i, d_i) = (to_i32(K, "batch·seq", tokens)?, d as i32);
        let mut a = stream.launch_builder(&self.f.rope_dq_convert);
        a.arg(dq_acc).arg(dq).arg(&hq_i).arg(dk).arg(&hk_i);
        a.arg(cos).arg(sin).arg(&t_i).arg(&d_i).arg(&scale);
        launch(a, config)
    }
}

/// The launch of a `rope_apply`-shaped kernel (`rope_lane` in rope.cu: head_dim/4 threads per
/// token, a block of tokens) after checking `head_dim` and the cos/sin tables' lengths
/// (`[tokens, head_dim/2]`); `rope_apply` and `rope_dq_convert` share it as they share the
/// kernel-side lane setup.
fn rope_blocks(
    kernel: &'static str,
    (cos, sin): (&CudaView<f32>, &CudaView<f32>),
    tokens: usize,
    head_dim: usize,
) -> Result<LaunchConfig, KernelError> {
    if !head_dim.is_multiple_of(4) || head_dim / 4 > 1024 || head_dim == 0 {
        return Err(shape(
            kernel,
            format!("head_dim {head_dim} must be a positive multiple of 4, at most 4096"),
        ));
    }
    check_len(kernel, "RoPE cos table", cos.len(), tokens * head_dim / 2)?;
    check_len(kernel, "RoPE sin table", sin.len(), tokens * head_dim / 2)?;
    let bx = (head_dim / 4) as u32;
    let by = (THREADS / bx).max(1);
    Ok(cfg(grid(tokens, by as usize, u32::MAX), (bx, by)))
}
