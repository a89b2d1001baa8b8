//! Rotary embedding on [tokens, heads, head_dim] rows (rotate_half convention).

/// cos/sin tables [tokens, half]: angle = pos * inv_freq in f32 (as the kernel and transformers),
/// trigonometry in f64.
pub fn cos_sin(pos: &[u32], inv_freq: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut c = Vec::with_capacity(pos.len() * inv_freq.len());
    let mut s = Vec::with_capacity(c.capacity());
    for &p in pos {
        for &f in inv_freq {
            let a = (p as f32 * f) as f64;
            c.push(a.cos() as f32);
            s.push(a.sin() as f32);
        }
    }
    (c, s)
}

/// Rotates `heads` heads of each token row of `x` (row stride `stride`) in place;
/// direction -1.0 applies the inverse rotation (the backward pass).
#[allow(clippy::too_many_arguments)]
pub fn apply(
    x: &mut [f32],
    stride: usize,
    heads: usize,
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
    tokens: usize,
    direction: f32,
) {
    let half = head_dim / 2;
    for t in 0..tokens {
        for h in 0..heads {
            let base = t * stride + h * head_dim;
            for i in 0..half {
                let c = cos[t * half + i] as f64;
                let s = (sin[t * half + i] * direction) as f64;
                let (x1, x2) = (x[base + i] as f64, x[base + i + half] as f64);
                x[base + i] = (x1 * c - x2 * s) as f32;
                x[base + i + half] = (x2 * c + x1 * s) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backward_undoes_forward_and_position_zero_is_identity() {
        let inv = crate::rope::inv_freq(8, 10_000.0, None);
        let pos = [0u32, 5, 1000];
        let (c, s) = cos_sin(&pos, &inv);
        let orig: Vec<f32> = (0..3 * 2 * 8).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut x = orig.clone();
        apply(&mut x, 16, 2, 8, &c, &s, 3, 1.0);
        assert_eq!(&x[..16], &orig[..16], "position 0 does not rotate");
        assert!(x[16..]
            .iter()
            .zip(&orig[16..])
            .any(|(a, b)| (a - b).abs() > 1e-3));
        apply(&mut x, 16, 2, 8, &c, &s, 3, -1.0);
        for (a, b) in x.iter().zip(&orig) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn rotation_pairs_i_with_i_plus_half() {
        // One head of size 4, inv_freq [1, 0]: pair (0,2) turns by pos radians, (1,3) stays.
        let (c, s) = cos_sin(&[1], &[1.0, 0.0]);
        let mut x = vec![1.0, 2.0, 0.0, 3.0];
        apply(&mut x, 4, 1, 4, &c, &s, 1, 1.0);
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[2] - 1f32.sin()).abs() < 1e-6);
        assert_eq!((x[1], x[3]), (2.0, 3.0));
    }
}
