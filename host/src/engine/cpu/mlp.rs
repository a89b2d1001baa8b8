//! SwiGLU: `a = silu(g) ⊙ u` with `silu(g) = g·σ(g)`.
//!
//! Backward: `du = da ⊙ silu(g)`, `dg = da ⊙ u ⊙ σ(g)·(1 + g·(1 − σ(g)))`.

use candle_core::{Result, Tensor};

pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// Returns `(d_gate, d_up)`.
pub fn swiglu_backward(da: &Tensor, gate: &Tensor, up: &Tensor) -> Result<(Tensor, Tensor)> {
    let sig = sigmoid(gate)?;
    let silu = (gate * &sig)?;
    let d_up = (da * &silu)?;
    // σ(g)·(1 + g·(1 − σ(g))) = σ(g) + silu(g)·(1 − σ(g))
    let dsilu = (&sig + (&silu * sig.affine(-1.0, 1.0)?)?)?;
    let d_gate = ((da * up)? * dsilu)?;
    Ok((d_gate, d_up))
}
