//! The MLP backward's SwiGLU fused with the gate and up adapters' `t = dy·B` and
//! `dB = s·dyᵀ·low` (the kernels' `swiglu_lora_bwd`): the two gradients the SwiGLU backward
//! writes, `[N, inter]` each, are multiplied while on chip instead of being read back by four
//! GEMMs (perf-notes §19). The input-gradient and `dA` products stay with the projections
//! ([`Linear::backward_input`], [`Linear::grad_a`]).

use std::sync::Arc;

use anyhow::Result;
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};
use ferrotune_kernels::device::{bf16, Kernels, LoraAdapter};

use super::linear::{DxTerm, Linear, LowGrad};
use super::raw::{strided_len, Borrowed};

/// Whether the fused backward serves this gate/up pair: both adapt, at a rank the kernel is
/// built for, and neither folds its input-gradient term into `dy` (only o/down do).
pub fn applies(gate: &Linear, up: &Linear) -> bool {
    match (gate.lora, up.lora) {
        (Some(g), Some(u)) => {
            g.r == u.r
                && Kernels::lora_grads_support(g.r)
                && [gate, up].iter().all(|lin| lin.dx_term != DxTerm::Folded)
        }
        _ => false,
    }
}

/// The buffers of one layer's MLP backward: `d_act` `[N, inter]`, the gate/up outputs that
/// become their gradients in place, and where the recomputed SwiGLU output goes.
pub struct MlpTensors<'a> {
    pub d_act: CudaView<'a, bf16>,
    pub gate: CudaViewMut<'a, bf16>,
    pub up: CudaViewMut<'a, bf16>,
    pub act: CudaViewMut<'a, bf16>,
}

/// Runs the fused backward for the pair ([`applies`] must hold): `gate`/`up` of `m` become
/// dg/du, `act` the SwiGLU output, both `dB`s are added to, and both `t`s land side by side at
/// the device address `t` (bf16 `[N, 2r]`: gate's `r` columns, then up's) through the fp32
/// `t_acc` `[N, 2r]`, which is zero before and after. Returns where gate's and up's `t` are,
/// for their input-gradient and `dA` products.
pub fn backward(
    stream: &Arc<CudaStream>,
    k: &Kernels,
    [gate, up]: [&Linear; 2],
    m: MlpTensors,
    t_acc: &mut CudaSlice<f32>,
    t: u64,
) -> Result<[LowGrad; 2]> {
    let (gl, ul) = match (gate.lora, up.lora) {
        (Some(g), Some(u)) => (g, u),
        _ => anyhow::bail!("the fused SwiGLU backward needs adapters on gate and up"),
    };
    let (n, inter, r) = (gate.n, gate.out, gl.r);
    let MlpTensors {
        d_act,
        gate: mut g_out,
        up: mut u_out,
        mut act,
    } = m;
    // SAFETY: each adapter's `B` and `dB` are `[inter, r]` shadows/gradients in the trainable
    // arena and its `low` `[N, r]` (rows `low_ld` apart) the forward's activation; `t` is
    // `[N, 2r]` of the caller's `t` buffer, clear of the `t` down's backward left there; all
    // live for the pass and ordered by this stream.
    let (bg, bu, lg, lu, mut dbg, mut dbu, mut tv) = unsafe {
        (
            Borrowed::<bf16>::new(stream, gl.b, inter * r),
            Borrowed::<bf16>::new(stream, ul.b, inter * r),
            Borrowed::<bf16>::new(stream, gl.low, strided_len(n, gl.low_ld, r)),
            Borrowed::<bf16>::new(stream, ul.low, strided_len(n, ul.low_ld, r)),
            Borrowed::<f32>::new(stream, gl.grad_b, inter * r),
            Borrowed::<f32>::new(stream, ul.grad_b, inter * r),
            Borrowed::<bf16>::new(stream, t, n * 2 * r),
        )
    };
    let mut gate_a = LoraAdapter {
        b: bg.view(),
        low: (lg.view(), gl.low_ld),
        grad_b: dbg.view_mut(),
    };
    let mut up_a = LoraAdapter {
        b: bu.view(),
        low: (lu.view(), ul.low_ld),
        grad_b: dbu.view_mut(),
    };
    let scales = [gate.grad_b_scale(&gl), up.grad_b_scale(&ul)];
    anyhow::ensure!(
        scales[0] == scales[1],
        "gate and up scale their dB alike (both folded or neither)"
    );
    k.swiglu_lora_bwd(
        stream,
        (&d_act, inter),
        (&mut g_out, gate.dy_ld),
        (&mut u_out, up.dy_ld),
        (&mut act, inter),
        [&mut gate_a, &mut up_a],
        &mut t_acc.slice_mut(..),
        (r, scales[0]),
        n,
        inter,
    )?;
    k.lora_t_store(
        stream,
        &mut t_acc.slice_mut(..),
        (&mut tv.view_mut(), 2 * r),
        (n, 2 * r),
        1.0,
    )?;
    let at = |col: usize, l: &super::linear::Lora| LowGrad {
        ptr: t + (col * std::mem::size_of::<bf16>()) as u64,
        ld: 2 * r,
        alpha: l.scale,
    };
    Ok([at(0, &gl), at(r, &ul)])
}
