//! Causal GQA attention over packed samples with the fused FlashAttention-2-style kernels of
//! `kernels/cuda/attention.cu` (docs/kernels.md): no `T×T` scores in memory, the causal upper
//! triangle and other packed samples' key blocks skipped.
//!
//! q/k/v stay token-major as the projections wrote them (`[N, heads·d]`); query head `h` reads
//! kv head `h / (H/Hkv)`. The forward writes the output and a logsumexp per (row, head)
//! (`[B, H, T]` fp32, kept with the layer's activations); the backward recomputes the
//! probabilities from q, k and that logsumexp, so it needs nothing else from the forward.
//! dK/dV come out already summed over each kv head's group.

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use cudarc::driver::{CudaSlice, CudaStream};
use ferrotune_kernels::device::{bf16, FlashBwdWork, FlashShape, Kernels};

/// Fails (before any weight is loaded) for a head size the fused kernels do not take.
pub fn check_supported(head_dim: usize) -> Result<()> {
    if let Some(why) = FlashShape::head_dim_unsupported(head_dim) {
        bail!(
            "{why}; this model's attention is not built in the cuda engine, run with --device cpu"
        );
    }
    Ok(())
}

/// Workspace shared by every layer: the segment classification of the batch's 64-token blocks
/// and the backward's fp32 buffers (delta `[B, H, T]`, the dQ accumulator `[N, H·d]`).
pub struct Scratch {
    blk: CudaSlice<u32>,
    delta: CudaSlice<f32>,
    /// `None`: the caller lends memory for the dQ accumulator to [`backward`].
    dq_acc: Option<CudaSlice<f32>>,
}

impl Scratch {
    pub fn new(stream: &Arc<CudaStream>, s: &FlashShape, own_dq_acc: bool) -> Result<Self> {
        check_supported(s.head_dim)?;
        Ok(Self {
            blk: stream.alloc_zeros(s.seg_blocks_len())?,
            delta: stream.alloc_zeros(s.lse_len())?,
            dq_acc: if own_dq_acc {
                Some(stream.alloc_zeros(s.q_len())?)
            } else {
                None
            },
        })
    }
}

/// `o [N, H·d] = attention(q, k, v)` and the logsumexp `lse [B, H, T]` for the backward.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    stream: &Arc<CudaStream>,
    kernels: &Kernels,
    shape: &FlashShape,
    (q, k, v): (&CudaSlice<bf16>, &CudaSlice<bf16>, &CudaSlice<bf16>),
    (o, lse): (&mut CudaSlice<bf16>, &mut CudaSlice<f32>),
    seg: &CudaSlice<u32>,
    s: &mut Scratch,
) -> Result<()> {
    // Cheap (one warp per 64 tokens); done per call so no caller has to know when the
    // segments changed.
    kernels.flash_seg_blocks(stream, shape, &seg.as_view(), &mut s.blk.as_view_mut())?;
    kernels.flash_attn_fwd(
        stream,
        shape,
        (&q.as_view(), &k.as_view(), &v.as_view()),
        &seg.as_view(),
        &s.blk.as_view(),
        &mut o.as_view_mut(),
        &mut lse.as_view_mut(),
    )?;
    Ok(())
}

/// Gradients `dq`, `dk`, `dv` (overwritten) from `d_o`, with the forward's output `o` and
/// logsumexp `lse` of the same batch, and the batch's RoPE tables `(cos, sin)`: `dq` and `dk`
/// come out rotated back, as the gradients of q and k before their rotation.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    stream: &Arc<CudaStream>,
    kernels: &Kernels,
    shape: &FlashShape,
    (q, k, v): (&CudaSlice<bf16>, &CudaSlice<bf16>, &CudaSlice<bf16>),
    (o, lse): (&CudaSlice<bf16>, &CudaSlice<f32>),
    d_o: &CudaSlice<bf16>,
    (dq, dk, dv): (
        &mut CudaSlice<bf16>,
        &mut CudaSlice<bf16>,
        &mut CudaSlice<bf16>,
    ),
    seg: &CudaSlice<u32>,
    s: &mut Scratch,
    spare: &mut CudaSlice<bf16>,
    (cos, sin): (&CudaSlice<f32>, &CudaSlice<f32>),
) -> Result<()> {
    kernels.flash_seg_blocks(stream, shape, &seg.as_view(), &mut s.blk.as_view_mut())?;
    let mut dq_acc = match s.dq_acc.as_mut() {
        Some(own) => own.as_view_mut(),
        // SAFETY: `spare` is memory no other kernel uses during this call (the caller's
        // contract); the flash backward zeroes the accumulator before adding into it.
        None => unsafe { spare.transmute_mut::<f32>(shape.q_len()) }
            .ok_or_else(|| anyhow!("the spare buffer is too small for the dQ accumulator"))?,
    };
    kernels.flash_attn_bwd(
        stream,
        shape,
        (&q.as_view(), &k.as_view(), &v.as_view()),
        (&o.as_view(), &d_o.as_view(), &lse.as_view()),
        &seg.as_view(),
        &s.blk.as_view(),
        FlashBwdWork {
            delta: &mut s.delta.as_view_mut(),
            dq_acc: &mut dq_acc,
        },
        (
            &mut dq.as_view_mut(),
            &mut dk.as_view_mut(),
            &mut dv.as_view_mut(),
        ),
        Some((cos.as_view(), sin.as_view())),
    )?;
    Ok(())
}
