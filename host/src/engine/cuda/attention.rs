//! Causal GQA attention over packed samples: cuBLASLt batched GEMMs for the products and the
//! `attention.cu` kernels for the masked softmax and its backward.
//!
//! q/k/v stay token-major as the projections wrote them (`[N, heads·d]`), so no transposes:
//! for batch row `b` and group member `g`, query head `kv·G + g` reads kv head `kv`, which is a
//! strided batch over `kv` with query stride `G·d` and key/value stride `d`. Scores for one
//! `(b, g)` are `[Hkv, T, T]` (fp32), probabilities the same in bf16; both buffers are reused
//! for every `(b, g)` and every layer, and the backward recomputes them instead of keeping
//! them (this version materialises `T×T` per head group; a fused flash-style kernel that
//! never does is the next step, see docs/engine.md).
//!
//! Forward: `S = Q·Kᵀ/√d`, `P = softmax_masked(S)`, `O = P·V`.
//! Backward: `dP = dO·Vᵀ`, `dV += Pᵀ·dO`, `dS = P ⊙ (dP − rowsum(P ⊙ dP))`,
//! `dQ = dS·K/√d`, `dK += dSᵀ·Q/√d` (sums over the group accumulate with `beta = 1`).

use std::sync::Arc;

use anyhow::Result;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use ferrotune_kernels::device::{bf16, Kernels};

use super::gemm::{Gemm, Operand, OutType, Output, Problem};

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Mistral's sliding window (0: none).
    pub window: usize,
}

impl Dims {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
    fn qd(&self) -> usize {
        self.heads * self.head_dim
    }
    fn kvd(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    /// Elements of the scores (and probabilities) scratch.
    pub fn scratch(&self) -> usize {
        self.kv_heads * self.seq * self.seq
    }
}

/// The per-(b, g) scratch.
pub struct Scratch {
    pub scores: CudaSlice<f32>,
    pub probs: CudaSlice<bf16>,
}

const BF: usize = 2;

struct Ptrs {
    q: u64,
    k: u64,
    v: u64,
}

fn q_op(d: &Dims, base: u64, b: usize, g: usize) -> Operand {
    let off = (b * d.seq * d.qd() + g * d.head_dim) * BF;
    Operand::new(base + off as u64, d.qd()).batched(d.group() * d.head_dim)
}

fn kv_op(d: &Dims, base: u64, b: usize) -> Operand {
    let off = b * d.seq * d.kvd() * BF;
    Operand::new(base + off as u64, d.kvd()).batched(d.head_dim)
}

fn q_out(d: &Dims, base: u64, b: usize, g: usize) -> Output {
    let off = (b * d.seq * d.qd() + g * d.head_dim) * BF;
    Output::new(base + off as u64, d.qd(), OutType::Bf16).batched(d.group() * d.head_dim)
}

fn kv_out(d: &Dims, base: u64, b: usize) -> Output {
    let off = b * d.seq * d.kvd() * BF;
    Output::new(base + off as u64, d.kvd(), OutType::Bf16).batched(d.head_dim)
}

#[allow(clippy::too_many_arguments)]
fn run(
    g: &mut Gemm,
    d: &Dims,
    m: usize,
    n: usize,
    k: usize,
    a: Operand,
    b: Operand,
    out: Output,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let p = Problem {
        m,
        n,
        k,
        batch: d.kv_heads,
        a,
        b,
        d: out,
        alpha,
        beta,
    };
    // SAFETY: q/k/v/o and the scratch are sized for `d` by the caller (`Buffers`).
    unsafe { g.run(&p) }
}

/// `P` for `(b, g)` into `scratch.probs` (scores in `scratch.scores`).
#[allow(clippy::too_many_arguments)]
fn probs(
    stream: &Arc<CudaStream>,
    kernels: &Kernels,
    gemm: &mut Gemm,
    d: &Dims,
    p: &Ptrs,
    seg: &CudaSlice<u32>,
    s: &mut Scratch,
    b: usize,
    g: usize,
) -> Result<()> {
    let t = d.seq;
    let scale = 1.0 / (d.head_dim as f32).sqrt();
    let (sp, _) = s.scores.device_ptr(stream);
    let scores = Output::new(sp, t, OutType::F32).batched(t * t);
    run(
        gemm,
        d,
        t,
        t,
        d.head_dim,
        q_op(d, p.q, b, g),
        kv_op(d, p.k, b).t(),
        scores,
        scale,
        0.0,
    )?;
    kernels.attn_softmax_fwd(
        stream,
        &s.scores.slice(..d.scratch()),
        &mut s.probs.slice_mut(..d.scratch()),
        &seg.slice(b * t..(b + 1) * t),
        d.scratch() / t,
        t,
        d.window,
    )?;
    Ok(())
}

/// `o [N, H·d] = attention(q, k, v)`.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    stream: &Arc<CudaStream>,
    kernels: &Kernels,
    gemm: &mut Gemm,
    d: &Dims,
    (q, k, v): (u64, u64, u64),
    o: u64,
    seg: &CudaSlice<u32>,
    s: &mut Scratch,
) -> Result<()> {
    let t = d.seq;
    let p = Ptrs { q, k, v };
    for b in 0..d.batch {
        for g in 0..d.group() {
            probs(stream, kernels, gemm, d, &p, seg, s, b, g)?;
            let (pp, _) = s.probs.device_ptr(stream);
            let pm = Operand::new(pp, t).batched(t * t);
            run(
                gemm,
                d,
                t,
                d.head_dim,
                t,
                pm,
                kv_op(d, p.v, b),
                q_out(d, o, b, g),
                1.0,
                0.0,
            )?;
        }
    }
    Ok(())
}

/// Gradients `dq`, `dk`, `dv` (overwritten) from `d_o`, recomputing the probabilities.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    stream: &Arc<CudaStream>,
    kernels: &Kernels,
    gemm: &mut Gemm,
    d: &Dims,
    (q, k, v): (u64, u64, u64),
    d_o: u64,
    (dq, dk, dv): (u64, u64, u64),
    seg: &CudaSlice<u32>,
    s: &mut Scratch,
) -> Result<()> {
    let t = d.seq;
    let scale = 1.0 / (d.head_dim as f32).sqrt();
    let p = Ptrs { q, k, v };
    for b in 0..d.batch {
        for g in 0..d.group() {
            let beta = if g > 0 { 1.0 } else { 0.0 };
            probs(stream, kernels, gemm, d, &p, seg, s, b, g)?;
            let (sp, _) = s.scores.device_ptr(stream);
            let (pp, _) = s.probs.device_ptr(stream);
            let pm = Operand::new(pp, t).batched(t * t);
            let dp = Output::new(sp, t, OutType::F32).batched(t * t);
            // dP = dO·Vᵀ (into the scores buffer), dV += Pᵀ·dO.
            run(
                gemm,
                d,
                t,
                t,
                d.head_dim,
                q_op(d, d_o, b, g),
                kv_op(d, p.v, b).t(),
                dp,
                1.0,
                0.0,
            )?;
            run(
                gemm,
                d,
                t,
                d.head_dim,
                t,
                pm.t(),
                q_op(d, d_o, b, g),
                kv_out(d, dv, b),
                1.0,
                beta,
            )?;
            kernels.attn_softmax_bwd(
                stream,
                &mut s.probs.slice_mut(..d.scratch()),
                &s.scores.slice(..d.scratch()),
                d.scratch() / t,
                t,
            )?;
            // dQ = dS·K/√d, dK += dSᵀ·Q/√d.
            run(
                gemm,
                d,
                t,
                d.head_dim,
                t,
                pm,
                kv_op(d, p.k, b),
                q_out(d, dq, b, g),
                scale,
                0.0,
            )?;
            run(
                gemm,
                d,
                t,
                d.head_dim,
                t,
                pm.t(),
                q_op(d, p.q, b, g),
                kv_out(d, dk, b),
                scale,
                beta,
            )?;
        }
    }
    Ok(())
}
