//! References for `attention.cu`: the masked row softmax of attention scores and its backward.

/// Whether key `j` is visible from query `i` (causal, same packed segment, sliding window;
/// `window == 0` means none).
pub fn visible(i: usize, j: usize, seg: &[u32], window: usize) -> bool {
    j <= i && seg[j] == seg[i] && (window == 0 || i - j < window)
}

/// `probs[r, :]` = softmax of `scores[r, :]` over the keys visible from query `r % seq`, 0 elsewhere.
pub fn softmax_fwd(
    scores: &[f32],
    seg: &[u32],
    rows: usize,
    seq: usize,
    window: usize,
) -> Vec<f64> {
    let mut out = vec![0.0f64; rows * seq];
    for r in 0..rows {
        let i = r % seq;
        let s = &scores[r * seq..(r + 1) * seq];
        let vis: Vec<usize> = (0..seq).filter(|&j| visible(i, j, seg, window)).collect();
        let mx = vis
            .iter()
            .map(|&j| s[j] as f64)
            .fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = vis.iter().map(|&j| (s[j] as f64 - mx).exp()).sum();
        for &j in &vis {
            out[r * seq + j] = (s[j] as f64 - mx).exp() / sum;
        }
    }
    out
}

/// dS = P ⊙ (dP − rowsum(P ⊙ dP)).
pub fn softmax_bwd(probs: &[f32], d_probs: &[f32], rows: usize, seq: usize) -> Vec<f64> {
    let mut out = vec![0.0f64; rows * seq];
    for r in 0..rows {
        let p = &probs[r * seq..(r + 1) * seq];
        let dp = &d_probs[r * seq..(r + 1) * seq];
        let dot: f64 = p.iter().zip(dp).map(|(&a, &b)| a as f64 * b as f64).sum();
        for j in 0..seq {
            out[r * seq + j] = p[j] as f64 * (dp[j] as f64 - dot);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_segments_do_not_see_each_other_and_rows_sum_to_one() {
        // Two packed samples [0, 0, 0 | 1, 1]: query 3 starts a new sample and sees only itself.
        let seg = [0, 0, 0, 1, 1];
        // Two heads of five queries each.
        let scores: Vec<f32> = (0..50).map(|x| (x as f32 * 0.37).sin()).collect();
        let p = softmax_fwd(&scores, &seg, 10, 5, 0);
        for r in 0..10 {
            let row = &p[r * 5..(r + 1) * 5];
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
        assert_eq!(&p[15..20], &[0.0, 0.0, 0.0, 1.0, 0.0]);
        assert!(p[4 * 5 + 2] == 0.0 && p[4 * 5 + 3] > 0.0);
        // Window 2: query 2 sees keys 1 and 2 only.
        let w = softmax_fwd(&scores, &seg, 5, 5, 2);
        assert!(w[2 * 5] == 0.0 && w[2 * 5 + 1] > 0.0);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let seg = [0u32; 4];
        let s: Vec<f32> = (0..16).map(|x| (x as f32 * 0.61).cos()).collect();
        let dp: Vec<f32> = vec![0.5, -1.0, 0.25, 2.0];
        let row = 3; // the last query sees all four keys
        let p = softmax_fwd(&s, &seg, 4, 4, 0);
        let p32: Vec<f32> = p[row * 4..].iter().map(|&x| x as f32).collect();
        let ds = softmax_bwd(&p32, &dp, 1, 4);
        let loss = |s: &[f32]| -> f64 {
            let p = softmax_fwd(s, &seg, 4, 4, 0);
            (0..4).map(|j| p[row * 4 + j] * dp[j] as f64).sum()
        };
        for j in 0..4 {
            let (mut a, mut b) = (s.clone(), s.clone());
            a[row * 4 + j] += 1e-3;
            b[row * 4 + j] -= 1e-3;
            let fd = (loss(&a) - loss(&b)) / 2e-3;
            assert!((fd - ds[j]).abs() < 1e-5, "{j}: {fd} vs {}", ds[j]);
        }
    }
}
