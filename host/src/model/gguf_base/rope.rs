//! Llama 3.1-style rope scaling recovered from a GGUF's `rope_freqs.weight`.
//!
//! llama.cpp's converter bakes `rope_scaling = {rope_type: llama3, …}` into one divisor per
//! rotary frequency and keeps none of the four parameters as metadata. Those divisors are 1 for
//! wavelengths below `high = original_max_position_embeddings / high_freq_factor`, `factor`
//! above `low = original_max_position_embeddings / low_freq_factor`, and a blend between whose
//! mixing weight is linear in 1/wavelength. So the tensor determines `factor`, `low` and `high`
//! (the latter two exactly when at least two frequencies fall in the blend, else within the gap
//! between neighbouring wavelengths), but not the context length and the two frequency factors
//! separately: scaling all three by one constant gives the same divisors, the same model.
//! `original_max_position_embeddings` therefore comes from `<arch>.rope.scaling.
//! original_context_length` when the file has it, else `low_freq_factor` is taken as 1, Meta's
//! value in every Llama 3.1/3.2/3.3 release. Whatever is chosen is accepted only if it
//! reproduces every stored divisor to f32 rounding.

use anyhow::{bail, Result};

use crate::gguf::arch::{llama3_freq_factors, rope_wavelengths};
use crate::model::RopeScaling;

/// What the file's metadata says besides the tensor.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Hints {
    /// `<arch>.rope.scaling.original_context_length`.
    pub original_context: Option<f64>,
}

/// Two divisors agree when they differ by at most a few f32 ulps.
fn same(a: f32, b: f32) -> bool {
    (a - b).abs() <= 4.0 * f32::EPSILON * a.abs().max(b.abs()).max(1.0)
}

/// The `RopeScaling::Llama3` whose divisors are `factors`; `None` when every divisor is 1 (no
/// scaling at all). Errors name the first divisor no candidate reproduces.
pub(super) fn recover_llama3(
    factors: &[f32],
    head_dim: usize,
    rope_theta: f64,
    hints: Hints,
) -> Result<Option<RopeScaling>> {
    if factors.len() != head_dim / 2 {
        bail!(
            "rope_freqs.weight has {} values; head_dim {head_dim} needs {}",
            factors.len(),
            head_dim / 2
        );
    }
    if let Some((i, f)) = factors
        .iter()
        .enumerate()
        .find(|(_, f)| !f.is_finite() || **f < 1.0 - 1e-6)
    {
        bail!(
            "rope_freqs.weight[{i}] = {f}: Llama 3.1 rope scaling divides frequencies by values \
             of at least 1; this file's rope scaling is a kind ferrotune does not know"
        );
    }
    if factors.iter().all(|&f| same(f, 1.0)) {
        return Ok(None);
    }
    let wavelens = rope_wavelengths(head_dim, rope_theta);
    // The low frequencies' divisor, the largest.
    let factor = factors.iter().fold(1f32, |m, &f| m.max(f)) as f64;
    let (low, high) = wavelength_bounds(factors, &wavelens, factor);
    let mut candidates = Vec::new();
    for (low, high) in [(low, high), meta_default_bounds(hints)] {
        let original = hints.original_context.unwrap_or(low);
        let exact = RopeScaling::Llama3 {
            factor,
            low_freq_factor: original / low,
            high_freq_factor: original / high,
            original_max_position_embeddings: original,
        };
        // Round-number spellings first (8192, 4.0 rather than 8191.9996, 3.9999998).
        candidates.push(tidy(&exact));
        candidates.push(exact);
    }
    let mut worst: Option<(usize, f32, f32)> = None;
    for candidate in candidates {
        let got = llama3_freq_factors(head_dim, rope_theta, &candidate)
            .expect("a Llama3 scaling has factors");
        match factors
            .iter()
            .zip(&got)
            .enumerate()
            .find(|(_, (a, b))| !same(**a, **b))
        {
            None => return Ok(Some(candidate)),
            Some((i, (&want, &have))) => {
                worst.get_or_insert((i, want, have));
            }
        }
    }
    let (i, want, have) = worst.expect("at least one candidate was tried");
    bail!(
        "rope_freqs.weight is not Llama 3.1 rope scaling: no factor/low_freq_factor/\
         high_freq_factor/original_max_position_embeddings reproduces it (divisor {i} is {want}, \
         the best fit gives {have}); use the Hugging Face model directory instead"
    )
}

/// `(low, high)`: the wavelengths where the blend ends in `factor` and in 1. With two or more
/// blended frequencies they follow from a least-squares line through the blend weights; else
/// from the middle of the gaps between the last unscaled, blended and fully scaled wavelengths.
fn wavelength_bounds(factors: &[f32], wavelens: &[f64], factor: f64) -> (f64, f64) {
    // The blend weight s (1 at `high`, 0 at `low`) from 1/divisor = (1 - s)/factor + s.
    let weight = |f: f32| (1.0 / f as f64 - 1.0 / factor) / (1.0 - 1.0 / factor);
    let is_one = |f: f32| same(f, 1.0);
    let is_full = |f: f32| same(f, factor as f32);
    let blend: Vec<(f64, f64)> = factors
        .iter()
        .zip(wavelens)
        .filter(|(f, _)| !is_one(**f) && !is_full(**f))
        .map(|(&f, &w)| (1.0 / w, weight(f)))
        .collect();
    if blend.len() >= 2 {
        // s = a/wavelen + b, with s = 0 at `low` and s = 1 at `high`.
        let n = blend.len() as f64;
        let (sx, sy) = blend
            .iter()
            .fold((0.0, 0.0), |(x, y), (bx, by)| (x + bx, y + by));
        let (mx, my) = (sx / n, sy / n);
        let (sxy, sxx) = blend.iter().fold((0.0, 0.0), |(xy, xx), (bx, by)| {
            (xy + (bx - mx) * (by - my), xx + (bx - mx) * (bx - mx))
        });
        let a = sxy / sxx;
        let b = my - a * mx;
        return (-a / b, a / (1.0 - b));
    }
    let max_where = |pred: &dyn Fn(f32) -> bool| {
        factors
            .iter()
            .zip(wavelens)
            .filter(|(f, _)| pred(**f))
            .map(|(_, &w)| w)
            .fold(None, |m: Option<f64>, w| Some(m.map_or(w, |m| m.max(w))))
    };
    let min_where = |pred: &dyn Fn(f32) -> bool| {
        factors
            .iter()
            .zip(wavelens)
            .filter(|(f, _)| pred(**f))
            .map(|(_, &w)| w)
            .fold(None, |m: Option<f64>, w| Some(m.map_or(w, |m| m.min(w))))
    };
    let mid = |lo: Option<f64>, hi: Option<f64>| match (lo, hi) {
        (Some(lo), Some(hi)) => (lo * hi).sqrt(),
        (Some(lo), None) => lo * 2.0,
        (None, Some(hi)) => hi / 2.0,
        (None, None) => 1.0,
    };
    let low = mid(max_where(&|f| !is_full(f)), min_where(&is_full));
    let high = mid(max_where(&is_one), min_where(&|f| !is_one(f)));
    (low, high)
}

/// Meta's Llama 3.1 values (low_freq_factor 1, high_freq_factor 4, 8192 positions), as
/// wavelength bounds: tried when the divisors leave the bounds free within a gap.
fn meta_default_bounds(hints: Hints) -> (f64, f64) {
    let original = hints.original_context.unwrap_or(8192.0);
    (original, original / 4.0)
}

/// `scaling` with each value rounded to a short decimal when that is within 1e-5 of it.
fn tidy(scaling: &RopeScaling) -> RopeScaling {
    let round = |v: f64, places: i32| {
        let scale = 10f64.powi(places);
        let r = (v * scale).round() / scale;
        if (r - v).abs() <= 1e-5 * v.abs().max(1.0) {
            r
        } else {
            v
        }
    };
    match *scaling {
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => RopeScaling::Llama3 {
            factor: round(factor, 3),
            low_freq_factor: round(low_freq_factor, 3),
            high_freq_factor: round(high_freq_factor, 3),
            original_max_position_embeddings: round(original_max_position_embeddings, 0),
        },
        ref other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama3(factor: f64, low: f64, high: f64, original: f64) -> RopeScaling {
        RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: original,
        }
    }

    /// Meta's Llama 3.1 8B and 3.2 1B scalings come back exactly from their divisors alone.
    #[test]
    fn meta_scalings_come_back_exactly() {
        for (head_dim, theta, scaling) in [
            (128, 500_000.0, llama3(8.0, 1.0, 4.0, 8192.0)),
            (64, 500_000.0, llama3(32.0, 1.0, 4.0, 8192.0)),
            // Few frequencies: one blended divisor, the bounds fall in gaps.
            (16, 10_000.0, llama3(8.0, 1.0, 4.0, 8192.0)),
        ] {
            let f = llama3_freq_factors(head_dim, theta, &scaling).unwrap();
            let got = recover_llama3(&f, head_dim, theta, Hints::default())
                .unwrap()
                .unwrap();
            assert_eq!(got, scaling, "head_dim {head_dim}");
        }
    }

    /// Other parameters: with the context length in the metadata they come back exactly;
    /// without it the recovered scaling differs in spelling but gives the same divisors.
    #[test]
    fn other_scalings_reproduce_their_divisors() {
        let scaling = llama3(16.0, 2.0, 8.0, 4096.0);
        let f = llama3_freq_factors(128, 500_000.0, &scaling).unwrap();
        let hints = Hints {
            original_context: Some(4096.0),
        };
        let got = recover_llama3(&f, 128, 500_000.0, hints).unwrap().unwrap();
        assert_eq!(got, scaling);
        let got = recover_llama3(&f, 128, 500_000.0, Hints::default())
            .unwrap()
            .unwrap();
        assert_ne!(got, scaling);
        assert_eq!(llama3_freq_factors(128, 500_000.0, &got).unwrap(), f);
    }

    #[test]
    fn all_ones_is_no_scaling_and_foreign_divisors_are_refused() {
        assert_eq!(
            recover_llama3(&[1.0; 8], 16, 10_000.0, Hints::default()).unwrap(),
            None
        );
        // A per-frequency table that is not monotone (LongRoPE-like) has no llama3 parameters.
        let foreign: Vec<f32> = (0..64).map(|i| 1.0 + ((i * 7) % 5) as f32).collect();
        let err = recover_llama3(&foreign, 128, 500_000.0, Hints::default()).unwrap_err();
        assert!(err.to_string().contains("not Llama 3.1"), "{err}");
        let err = recover_llama3(&[1.0; 4], 16, 10_000.0, Hints::default()).unwrap_err();
        assert!(err.to_string().contains("head_dim 16 needs 8"), "{err}");
        let err = recover_llama3(&[0.5; 8], 16, 10_000.0, Hints::default()).unwrap_err();
        assert!(
            err.to_string().contains("rope_freqs.weight[0] = 0.5"),
            "{err}"
        );
    }
}
