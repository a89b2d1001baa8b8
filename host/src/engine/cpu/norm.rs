//! RMSNorm over the last dimension: `y = x · rstd · w`, `rstd = 1/sqrt(mean(x²) + eps)`.
//!
//! Backward (w frozen): with `u = dy · w` and `x̂ = x · rstd`,
//! `dx = rstd · (u − x̂ · mean(u · x̂))`.

use candle_core::{Result, Tensor, D};

/// Returns `y` and the per-row `rstd` (shape `[..., 1]`) that the backward needs.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let rstd = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let y = x.broadcast_mul(&rstd)?.broadcast_mul(w)?;
    Ok((y, rstd))
}

/// `∂L/∂x` from `∂L/∂y`; the weight is frozen, so it gets no gradient.
pub fn rms_norm_backward(dy: &Tensor, x: &Tensor, w: &Tensor, rstd: &Tensor) -> Result<Tensor> {
    let u = dy.broadcast_mul(w)?;
    let xhat = x.broadcast_mul(rstd)?;
    let m = (&u * &xhat)?.mean_keepdim(D::Minus1)?;
    (u - xhat.broadcast_mul(&m)?)?.broadcast_mul(rstd)
}
