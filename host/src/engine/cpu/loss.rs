//! LM head + cross-entropy, summed over trainable tokens.
//!
//! Only rows whose target is not [`IGNORE`] are projected onto the vocabulary, in chunks of at
//! most [`CHUNK_LOGITS`] logits, so the full `[N, V]` logit matrix never exists. Per row,
//! `ℓ = logsumexp(z) − z_t`; backward `dz = softmax(z) − onehot(t)` and `dh = dz·W_lm`
//! (`W_lm [V, H]` is frozen: the embedding when tied).

use candle_core::{DType, Device, Result, Tensor, D};

use crate::engine::IGNORE;

/// Upper bound on logits alive at once (64 MiB of f32).
pub const CHUNK_LOGITS: usize = 16 << 20;

/// Loss sum and, when `grad_scale` is given, `grad_scale · ∂loss_sum/∂h` (`[N, H]`).
pub fn lm_head_cross_entropy(
    h: &Tensor,
    w_lm: &Tensor,
    targets: &[i32],
    grad_scale: Option<f64>,
) -> Result<(f64, Option<Tensor>)> {
    let chunk_rows = (CHUNK_LOGITS / w_lm.dim(0)?).max(1);
    chunked(h, w_lm, targets, grad_scale, chunk_rows)
}

/// [`lm_head_cross_entropy`] with an explicit number of rows per chunk.
pub fn chunked(
    h: &Tensor,
    w_lm: &Tensor,
    targets: &[i32],
    grad_scale: Option<f64>,
    chunk: usize,
) -> Result<(f64, Option<Tensor>)> {
    let rows: Vec<u32> = (0..targets.len() as u32)
        .filter(|&i| targets[i as usize] != IGNORE)
        .collect();
    let mut dh = grad_scale.map(|_| h.zeros_like()).transpose()?;
    let mut loss_sum = 0.0f64;
    for rows in rows.chunks(chunk) {
        let n = rows.len();
        let idx = Tensor::from_slice(rows, n, &Device::Cpu)?;
        let t: Vec<u32> = rows.iter().map(|&i| targets[i as usize] as u32).collect();
        let t = Tensor::from_vec(t, (n, 1), &Device::Cpu)?;
        let hs = h.index_select(&idx, 0)?;
        let z = hs.matmul(&w_lm.t()?)?; // [n, V]
        let max = z.max_keepdim(D::Minus1)?;
        let lse = (z
            .broadcast_sub(&max)?
            .exp()?
            .sum_keepdim(D::Minus1)?
            .log()?
            + &max)?;
        let zt = z.gather(&t, 1)?;
        let losses = (lse.to_dtype(DType::F64)? - zt.to_dtype(DType::F64)?)?;
        loss_sum += losses.sum_all()?.to_scalar::<f64>()?;
        if let (Some(dh), Some(scale)) = (dh.as_mut(), grad_scale) {
            let probs = z.broadcast_sub(&lse)?.exp()?;
            let onehot = probs.zeros_like()?.scatter_add(
                &t,
                &Tensor::ones((n, 1), DType::F32, &Device::Cpu)?,
                1,
            )?;
            let dz = ((probs - onehot)? * scale)?;
            *dh = dh.index_add(&idx, &dz.matmul(w_lm)?, 0)?;
        }
    }
    Ok((loss_sum, dh))
}
