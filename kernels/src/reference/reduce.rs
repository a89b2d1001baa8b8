//! Sums and the gradient-clipping coefficient.

pub fn sum(x: &[f32]) -> f64 {
    x.iter().map(|&v| v as f64).sum()
}

pub fn sum_sq(x: &[f32]) -> f64 {
    x.iter().map(|&v| (v as f64) * (v as f64)).sum()
}

/// torch.nn.utils.clip_grad_norm_'s factor: min(1, max_norm / (norm + 1e-6)); 1 when
/// max_norm <= 0 (clipping off).
pub fn clip_coef(norm: f32, max_norm: f32) -> f32 {
    if max_norm > 0.0 {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_only_shrinks() {
        assert_eq!(clip_coef(0.5, 1.0), 1.0);
        assert!((clip_coef(4.0, 1.0) - 0.25).abs() < 1e-6);
        assert_eq!(clip_coef(4.0, 0.0), 1.0);
        assert_eq!(sum_sq(&[3.0, 4.0]), 25.0);
        assert_eq!(sum(&[3.0, -4.0]), -1.0);
    }
}
