//! Cross-entropy over full logit rows: per-row logsumexp, loss and dL/dlogits.

use crate::IGNORE_INDEX;

/// Per-row results of [`cross_entropy`].
#[derive(Debug, Clone)]
pub struct CrossEntropy {
    /// logsumexp of each row (0 for ignored rows).
    pub lse: Vec<f64>,
    /// lse - logit[target] (0 for ignored rows).
    pub loss: Vec<f64>,
    /// (softmax - onehot(target)) * scale, [rows, vocab]; 0 rows where ignored.
    pub dlogits: Vec<f32>,
}

pub fn cross_entropy(logits: &[f32], vocab: usize, targets: &[i32], scale: f32) -> CrossEntropy {
    let rows = targets.len();
    let mut out = CrossEntropy {
        lse: vec![0.0; rows],
        loss: vec![0.0; rows],
        dlogits: vec![0.0; rows * vocab],
    };
    for (r, &t) in targets.iter().enumerate() {
        if t == IGNORE_INDEX {
            continue;
        }
        let row = &logits[r * vocab..(r + 1) * vocab];
        let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
        let s: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
        let lse = m + s.ln();
        out.lse[r] = lse;
        out.loss[r] = lse - row[t as usize] as f64;
        for (j, (d, &x)) in out.dlogits[r * vocab..(r + 1) * vocab]
            .iter_mut()
            .zip(row)
            .enumerate()
        {
            let p = (x as f64 - lse).exp() - if j as i32 == t { 1.0 } else { 0.0 };
            *d = (p * scale as f64) as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_is_negative_log_softmax_and_gradient_rows_sum_to_zero() {
        let logits = [1.0f32, 2.0, 3.0, 0.5, 0.5, 0.5];
        let ce = cross_entropy(&logits, 3, &[2, IGNORE_INDEX], 0.5);
        let lse = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((ce.loss[0] - (lse - 3.0)).abs() < 1e-12);
        assert_eq!((ce.loss[1], ce.lse[1]), (0.0, 0.0));
        let row_sum: f32 = ce.dlogits[..3].iter().sum();
        assert!(row_sum.abs() < 1e-6);
        assert!(ce.dlogits[2] < 0.0 && ce.dlogits[0] > 0.0);
        assert!(ce.dlogits[3..].iter().all(|&d| d == 0.0));
    }
}
