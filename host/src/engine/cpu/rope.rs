//! Rotary position embeddings in Hugging Face's `rotate_half` layout: the two halves of each head
//! are the (real, imaginary) pairs, `y = x·cos + rotate_half(x)·sin` with
//! `rotate_half([x1, x2]) = [−x2, x1]` and cos/sin duplicated over both halves.
//!
//! The map is a rotation per pair, so its transpose is the rotation by −θ:
//! `dx = dy·cos − rotate_half(dy)·sin` (the same kernel with `sin` negated).

use candle_core::{Device, Result, Tensor, D};

use crate::model::{ModelConfig, RopeScaling};

/// Per-frequency inverse wavelengths, with the model's rope scaling applied.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Self {
        let dim = cfg.head_dim;
        // As transformers computes it: base^(2i/dim) in f32.
        let base: Vec<f32> = (0..dim / 2)
            .map(|i| (1.0 / cfg.rope_theta.powf((2 * i) as f64 / dim as f64)) as f32)
            .collect();
        let inv_freq = match cfg.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => {
                base.iter().map(|f| (*f as f64 / factor) as f32).collect()
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_ctx,
            } => {
                // transformers' `_compute_llama3_parameters`: long wavelengths are interpolated
                // by `factor`, short ones kept, and the band between blended linearly in 1/λ.
                let low_wavelen = old_ctx / low_freq_factor;
                let high_wavelen = old_ctx / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let f = f as f64;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old_ctx / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        };
                        scaled as f32
                    })
                    .collect()
            }
        };
        Rope { inv_freq }
    }

    /// The scaled frequencies (the cuda engine uploads them for its RoPE kernels).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// `(cos, sin)`, each `[positions.len(), head_dim]`, for per-token positions.
    pub fn tables(&self, positions: &[u32]) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half * 2);
        let mut sin = Vec::with_capacity(positions.len() * half * 2);
        for &p in positions {
            let start = cos.len();
            for &f in &self.inv_freq {
                // The angle is an f32 product, as in transformers' `position_ids @ inv_freq`.
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
            cos.extend_from_within(start..start + half);
            sin.extend_from_within(start..start + half);
        }
        let shape = (positions.len(), half * 2);
        Ok((
            Tensor::from_vec(cos, shape, &Device::Cpu)?,
            Tensor::from_vec(sin, shape, &Device::Cpu)?,
        ))
    }
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// Rotates `x` (`[..., head_dim]`); `cos`/`sin` broadcast against it.
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?
}

/// The transpose of [`apply`]: rotation by the opposite angle.
pub fn apply_backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    dy.broadcast_mul(cos)? - rotate_half(dy)?.broadcast_mul(sin)?
}
