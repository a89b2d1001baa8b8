//! The counter-based dropout mask of `dropout.cu`, bit-exact.

/// Dropout probability → (threshold, scale) for the kernel: keep(i) = bits(i) >= threshold,
/// kept values scaled by 1/(1-p). `p` must lie in [0, 1).
pub fn dropout_params(p: f32) -> (u32, f32) {
    assert!(
        (0.0..1.0).contains(&p),
        "dropout probability {p} outside [0, 1)"
    );
    let threshold = ((p as f64) * 4_294_967_296.0).round().min(u32::MAX as f64) as u32;
    (threshold, 1.0 / (1.0 - p))
}

/// splitmix64's finaliser over (seed, index), top 32 bits (the kernel's `mask_bits`).
pub fn mask_bits(seed: u64, i: u64) -> u32 {
    let mut z = seed.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 32) as u32
}

/// out = (accumulate ? out : 0) + mask ⊙ x · scale, in f32 (the kernel rounds to bf16 once).
pub fn dropout_apply(
    x: &[f32],
    out: &mut [f32],
    threshold: u32,
    scale: f32,
    seed: u64,
    accumulate: bool,
) {
    for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        let base = if accumulate { *o } else { 0.0 };
        let kept = if mask_bits(seed, i as u64) >= threshold {
            v * scale
        } else {
            0.0
        };
        *o = base + kept;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_about_one_minus_p_and_the_mask_depends_on_seed_and_index_only() {
        let (t, s) = dropout_params(0.1);
        assert!((s - 1.0 / 0.9).abs() < 1e-7);
        let n = 100_000;
        let kept = (0..n).filter(|&i| mask_bits(42, i) >= t).count();
        assert!((kept as f64 / n as f64 - 0.9).abs() < 0.005, "{kept}");
        // Regenerated identically (the backward), different for another seed.
        let a: Vec<bool> = (0..64).map(|i| mask_bits(42, i) >= t).collect();
        let b: Vec<bool> = (0..64).map(|i| mask_bits(42, i) >= t).collect();
        let c: Vec<bool> = (0..64).map(|i| mask_bits(43, i) >= t).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(dropout_params(0.0), (0, 1.0));
    }

    #[test]
    fn backward_is_the_same_masked_scaling_and_accumulates() {
        let (t, s) = dropout_params(0.5);
        let x = [1.0f32; 16];
        let mut fwd = [0.0f32; 16];
        dropout_apply(&x, &mut fwd, t, s, 7, false);
        assert!(fwd.iter().all(|&v| v == 0.0 || v == 2.0));
        let mut dx = [0.5f32; 16];
        dropout_apply(&x, &mut dx, t, s, 7, true);
        for (a, b) in dx.iter().zip(&fwd) {
            assert_eq!(*a, 0.5 + b);
        }
    }
}
