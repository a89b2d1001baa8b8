//! A frozen linear layer with an optional LoRA adapter and an optional (frozen or trainable) bias:
//! `y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`, with `W [out, in]`, `A [r, in]`, `B [out, r]`, `s` the
//! LoRA scale and `drop(x) = x ⊙ mask` (mask entries 0 or 1/(1−p)).
//!
//! Products are always low-rank first, so the adapter costs `O(N·r·(in+out))`, never `in·out`:
//! - `dx = dy·W + s·((dy·B)·A) ⊙ mask`
//! - `dA = s·(dy·B)ᵀ·drop(x)`, `dB = s·dyᵀ·(drop(x)·Aᵀ)`, `db = Σ_rows dy`.
//!
//! `W` itself never gets a gradient.

use candle_core::{Result, Tensor};

/// The trainable low-rank pair of one projection.
#[derive(Debug, Clone, Copy)]
pub struct Adapter<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scale: f64,
}

/// One projection's tensors for a pass.
#[derive(Debug, Clone, Copy)]
pub struct Linear<'a> {
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub adapter: Option<Adapter<'a>>,
}

/// What the backward keeps from the forward.
#[derive(Debug)]
pub struct LinearCache {
    /// `drop(x)` when dropout is on (else the backward uses `x`).
    dropped: Option<Tensor>,
    /// The dropout mask (0 or 1/(1−p)).
    mask: Option<Tensor>,
    /// `drop(x)·Aᵀ`, `[N, r]`.
    low: Option<Tensor>,
}

/// Gradients of one projection's trainable tensors.
#[derive(Debug)]
pub struct LinearGrads {
    pub a: Option<Tensor>,
    pub b: Option<Tensor>,
    pub bias: Option<Tensor>,
}

impl Linear<'_> {
    /// `x` is `[N, in]`; `mask`, if given, is the adapter-input dropout mask `[N, in]`.
    pub fn forward(&self, x: &Tensor, mask: Option<Tensor>) -> Result<(Tensor, LinearCache)> {
        let mut y = x.matmul(&self.weight.t()?)?;
        if let Some(bias) = self.bias {
            y = y.broadcast_add(bias)?;
        }
        let cache = self.forward_low(x, mask)?;
        if let (Some(ad), Some(low)) = (self.adapter, &cache.low) {
            y = (y + (low.matmul(&ad.b.t()?)? * ad.scale)?)?;
        }
        Ok((y, cache))
    }

    /// Only what the backward reads from the forward: the adapter's `drop(x)·Aᵀ` (and the
    /// dropped input). For a checkpointing recompute of a projection whose output nothing
    /// reads, it skips the frozen matmul.
    pub fn forward_low(&self, x: &Tensor, mask: Option<Tensor>) -> Result<LinearCache> {
        let Some(ad) = self.adapter else {
            return Ok(LinearCache {
                dropped: None,
                mask: None,
                low: None,
            });
        };
        let dropped = mask.as_ref().map(|m| x * m).transpose()?;
        let low = dropped.as_ref().unwrap_or(x).matmul(&ad.a.t()?)?;
        Ok(LinearCache {
            dropped,
            mask,
            low: Some(low),
        })
    }

    /// Returns `dx` (when `need_dx`) and the gradients of the adapter and of the bias (when
    /// `bias_trainable`).
    pub fn backward(
        &self,
        dy: &Tensor,
        x: &Tensor,
        cache: &LinearCache,
        need_dx: bool,
        bias_trainable: bool,
    ) -> Result<(Option<Tensor>, LinearGrads)> {
        let mut grads = LinearGrads {
            a: None,
            b: None,
            bias: None,
        };
        if bias_trainable {
            grads.bias = Some(dy.sum(0)?);
        }
        let mut dx = need_dx.then(|| dy.matmul(self.weight)).transpose()?;
        if let Some(ad) = self.adapter {
            let low = cache
                .low
                .as_ref()
                .expect("adapter forward always caches x·Aᵀ");
            let input = cache.dropped.as_ref().unwrap_or(x);
            let dy_b = (dy.matmul(ad.b)? * ad.scale)?; // [N, r]
            grads.a = Some(dy_b.t()?.matmul(input)?);
            grads.b = Some((dy.t()?.matmul(low)? * ad.scale)?);
            if let Some(dx) = dx.as_mut() {
                let mut lora_dx = dy_b.matmul(ad.a)?;
                if let Some(m) = &cache.mask {
                    lora_dx = (lora_dx * m)?;
                }
                *dx = (&*dx + lora_dx)?;
            }
        }
        Ok((dx, grads))
    }
}
