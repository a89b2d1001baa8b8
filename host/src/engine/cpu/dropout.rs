//! LoRA dropout masks that are a pure function of `(seed, pass, layer, module)`.
//!
//! Deriving each mask from its coordinates (instead of drawing from one running RNG) makes the
//! activation-checkpointing recompute see the same mask as the forward, and makes resume exact:
//! the only state is the pass counter, which the backend exports with its optimizer state.

use candle_core::{Device, Result, Tensor};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Identifies one dropout site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Site {
    /// Number of `forward_backward` passes before this one.
    pub pass: u64,
    pub layer: usize,
    /// Index of the projection in [`crate::job::PROJECTIONS`].
    pub module: usize,
}

/// A `[rows, cols]` mask with entries 0 (probability `p`) or `1/(1−p)`.
pub fn mask(seed: u64, site: Site, p: f64, rows: usize, cols: usize) -> Result<Tensor> {
    let mut key = [0u8; 32];
    let words = [
        seed,
        site.pass,
        ((site.layer as u64) << 8) | site.module as u64,
        0x4c6f_5241_4472_6f70, // "LoRADrop": separates this stream from other uses of `seed`
    ];
    for (chunk, w) in key.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    let mut rng = ChaCha8Rng::from_seed(key);
    // Keep when a uniform u32 is at or above p·2³²: exact Bernoulli(1−p) up to 2⁻³² granularity.
    let threshold = (p * 4_294_967_296.0).min(4_294_967_295.0) as u32;
    let keep = (1.0 / (1.0 - p)) as f32;
    let data: Vec<f32> = (0..rows * cols)
        .map(|_| {
            if rng.next_u32() >= threshold {
                keep
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(data, (rows, cols), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_are_reproducible_per_site_and_drop_about_p() {
        let site = Site {
            pass: 3,
            layer: 1,
            module: 2,
        };
        let a = mask(7, site, 0.25, 64, 64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = mask(7, site, 0.25, 64, 64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b);
        let other = Site { pass: 4, ..site };
        let c = mask(7, other, 0.25, 64, 64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_ne!(a, c);
        let dropped = a.iter().filter(|&&v| v == 0.0).count() as f64 / a.len() as f64;
        assert!((dropped - 0.25).abs() < 0.04, "{dropped}");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
    }
}
