//! LoRA dropout masks that are a pure function of `(seed, pass, layer, module)` and the element's
//! index.
//!
//! Deriving each mask from its coordinates (instead of drawing from one running RNG) makes the
//! activation-checkpointing recompute see the same mask as the forward, and makes resume exact:
//! the only state is the pass counter, which the backend exports with its optimizer state.
//! The mask of element `i` is the GPU kernel's (`ferrotune_kernels::reference::dropout`, a
//! counter-based hash of `(site_seed, i)`), so both engines drop exactly the same values and the
//! cuda engine regenerates the mask in its backward instead of storing it.

use candle_core::{Device, Result, Tensor};
use ferrotune_kernels::reference::dropout::{dropout_params, mask_bits};

/// Identifies one dropout site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Site {
    /// Number of `forward_backward` passes before this one.
    pub pass: u64,
    pub layer: usize,
    /// Index of the projection in [`crate::job::PROJECTIONS`].
    pub module: usize,
}

/// The seed of one site's mask: `seed` and the site's coordinates folded through splitmix64
/// (a bijective mix per word, so distinct sites get unrelated masks).
pub fn site_seed(seed: u64, site: Site) -> u64 {
    let words = [
        0x4c6f_5241_4472_6f70, // "LoRADrop": separates this stream from other uses of `seed`
        site.pass,
        ((site.layer as u64) << 8) | site.module as u64,
    ];
    words.iter().fold(seed, |acc, &w| splitmix64(acc ^ w))
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A `[rows, cols]` mask with entries 0 (probability `p`) or `1/(1−p)`, row-major element `i`
/// kept when `mask_bits(site_seed, i) >= round(p·2³²)` — the cuda engine's mask, bit for bit.
pub fn mask(seed: u64, site: Site, p: f64, rows: usize, cols: usize) -> Result<Tensor> {
    let (threshold, keep) = dropout_params(p as f32);
    let s = site_seed(seed, site);
    let data: Vec<f32> = (0..(rows * cols) as u64)
        .map(|i| {
            if mask_bits(s, i) >= threshold {
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
        // Other layers and modules of the same pass draw other masks too.
        for other in [Site { layer: 2, ..site }, Site { module: 3, ..site }] {
            assert_ne!(site_seed(7, site), site_seed(7, other));
        }
    }

    #[test]
    fn the_mask_is_the_gpu_kernels() {
        // Element i of the mask is what `dropout.cu` computes for (site seed, i).
        let site = Site {
            pass: 1,
            layer: 0,
            module: 6,
        };
        let m = mask(42, site, 0.3, 8, 16)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (t, s) = dropout_params(0.3);
        let x = vec![1.0f32; 128];
        let mut want = vec![0.0f32; 128];
        ferrotune_kernels::reference::dropout::dropout_apply(
            &x,
            &mut want,
            t,
            s,
            site_seed(42, site),
            false,
        );
        assert_eq!(m, want);
    }
}
