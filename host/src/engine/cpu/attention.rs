//! Causal grouped-query attention restricted to tokens of the same packed sample.
//!
//! Layout: `q` is `[B, H, T, d]`, `k`/`v` are `[B, Hkv, T, d]`, with query head `h` reading kv head
//! `h / G` (`G = H / Hkv`, transformers' `repeat_kv`). Viewing `q` as `[B, Hkv, G·T, d]` lets one
//! batched GEMM per kv head serve its whole group, and the backward's `dK = dSᵀ·Q` then sums over
//! the group without a separate reduction.
//!
//! Forward: `S = Q·Kᵀ/√d + M`, `P = softmax(S)`, `O = P·V`.
//! Backward: `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P ⊙ (dP − rowsum(dP ⊙ P))`,
//! `dQ = dS·K/√d`, `dK = dSᵀ·Q/√d`.

use candle_core::{Device, Result, Tensor, D};

/// The additive mask `[B, 1, 1, T, T]`: 0 where query `i` may see key `j` (`j ≤ i`, same segment,
/// and within the sliding window if any), −∞ elsewhere. Every row keeps its diagonal, so no
/// softmax row is empty.
pub fn mask(
    batch_size: usize,
    seq_len: usize,
    segment_ids: &[u32],
    window: Option<usize>,
) -> Result<Tensor> {
    let t = seq_len;
    let mut m = vec![f32::NEG_INFINITY; batch_size * t * t];
    for b in 0..batch_size {
        let seg = &segment_ids[b * t..(b + 1) * t];
        for i in 0..t {
            let first = window.map_or(0, |w| (i + 1).saturating_sub(w));
            for j in first..=i {
                if seg[j] == seg[i] {
                    m[(b * t + i) * t + j] = 0.0;
                }
            }
        }
    }
    Tensor::from_vec(m, (batch_size, 1, 1, t, t), &Device::Cpu)
}

/// What the backward needs besides the inputs.
#[derive(Debug)]
pub struct AttnCache {
    /// Softmax probabilities `[B, Hkv, G·T, T]`.
    pub probs: Tensor,
}

fn dims(q: &Tensor, k: &Tensor) -> Result<(usize, usize, usize, usize, usize)> {
    let (b, h, t, d) = q.dims4()?;
    let hkv = k.dim(1)?;
    Ok((b, h, hkv, t, d))
}

/// Returns `O` as `[B, H, T, d]`.
pub fn forward(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<(Tensor, AttnCache)> {
    let (b, h, hkv, t, d) = dims(q, k)?;
    let g = h / hkv;
    let scale = 1.0 / (d as f64).sqrt();
    let qg = q.reshape((b, hkv, g * t, d))?;
    let scores = (qg.matmul(&k.t()?)? * scale)?
        .reshape((b, hkv, g, t, t))?
        .broadcast_add(mask)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let probs = e
        .broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        .reshape((b, hkv, g * t, t))?;
    let out = probs.matmul(v)?.reshape((b, h, t, d))?;
    Ok((out, AttnCache { probs }))
}

/// Returns `(dQ, dK, dV)` in the layouts of `q`, `k`, `v`.
pub fn backward(
    d_out: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cache: &AttnCache,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, h, hkv, t, d) = dims(q, k)?;
    let g = h / hkv;
    let scale = 1.0 / (d as f64).sqrt();
    let p = &cache.probs;
    let dog = d_out.reshape((b, hkv, g * t, d))?;
    let dv = p.t()?.matmul(&dog)?;
    let dp = dog.matmul(&v.t()?)?;
    let row = (&dp * p)?.sum_keepdim(D::Minus1)?;
    let ds = ((dp.broadcast_sub(&row)? * p)? * scale)?;
    let dq = ds.matmul(k)?.reshape((b, h, t, d))?;
    let qg = q.reshape((b, hkv, g * t, d))?;
    let dk = ds.t()?.matmul(&qg)?;
    Ok((dq, dk, dv))
}
