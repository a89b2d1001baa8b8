//! Rotary frequencies, including Llama-3.1 "llama3" rope scaling, computed on the host once and
//! uploaded; the RoPE kernels only see `inv_freq`.

/// `rope_scaling` of a Llama-3.x config.json with `rope_type == "llama3"`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: f32,
}

/// inv_freq[i] = 1 / theta^(2i / head_dim) for i < head_dim/2, in f32 like transformers'
/// `_compute_default_rope_parameters`, then reshaped by llama3 scaling when given
/// (`_compute_llama3_parameters`): long wavelengths are divided by `factor`, short ones kept,
/// and the band between is interpolated smoothly.
pub fn inv_freq(head_dim: usize, theta: f32, scaling: Option<&Llama3Scaling>) -> Vec<f32> {
    let base: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let Some(s) = scaling else {
        return base;
    };
    let low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
    let high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
    base.into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            if wavelen > low_freq_wavelen {
                f / s.factor
            } else if wavelen < high_freq_wavelen {
                f
            } else {
                let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA31: Llama3Scaling = Llama3Scaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    };

    #[test]
    fn default_frequencies_follow_the_geometric_series() {
        let f = inv_freq(128, 500_000.0, None);
        assert_eq!(f.len(), 64);
        assert_eq!(f[0], 1.0);
        let expect = 1.0 / 500_000f64.powf(126.0 / 128.0);
        assert!(((f[63] as f64) - expect).abs() / expect < 1e-5);
    }

    #[test]
    fn llama3_scaling_keeps_high_divides_low_and_blends_the_middle() {
        let plain = inv_freq(128, 500_000.0, None);
        let scaled = inv_freq(128, 500_000.0, Some(&LLAMA31));
        // Short wavelengths (first frequencies) are untouched.
        assert_eq!(scaled[0], plain[0]);
        // The longest wavelength is divided by the factor.
        assert_eq!(scaled[63], plain[63] / 8.0);
        // Medium band: strictly between the two, and monotone like the input.
        let mid = (0..64)
            .filter(|&i| {
                let w = 2.0 * std::f32::consts::PI / plain[i];
                (2048.0..=8192.0).contains(&w)
            })
            .collect::<Vec<_>>();
        assert!(!mid.is_empty());
        for i in mid {
            assert!(scaled[i] < plain[i] && scaled[i] > plain[i] / 8.0, "{i}");
        }
        assert!(scaled.windows(2).all(|w| w[0] > w[1]));
    }
}
