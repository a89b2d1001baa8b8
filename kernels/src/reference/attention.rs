//! References for `attention.cu`: causal GQA attention over packed segments (optional sliding
//! window), forward and backward, in f64 on the given (bf16-rounded) inputs.
//!
//! Layouts are the kernels': q/o `[B·T, H·d]`, k/v `[B·T, Hkv·d]` token-major, query head h
//! reads kv head `h / (H/Hkv)`, lse `[B, H, T]`, scale 1/√d.

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Sliding window (0: none).
    pub window: usize,
}

impl Dims {
    fn q_at(&self, b: usize, i: usize, h: usize) -> usize {
        ((b * self.seq + i) * self.heads + h) * self.head_dim
    }
    fn kv_at(&self, b: usize, j: usize, h: usize) -> usize {
        let kv = h / (self.heads / self.kv_heads);
        ((b * self.seq + j) * self.kv_heads + kv) * self.head_dim
    }
    fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }
}

/// Whether key `j` is visible from query `i` of one row (causal, same packed segment, sliding
/// window; `window == 0` means none).
pub fn visible(i: usize, j: usize, seg: &[u32], window: usize) -> bool {
    j <= i && seg[j] == seg[i] && (window == 0 || i - j < window)
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Softmax probabilities of query `i` (head `h`, row `b`) over its visible keys: (key, p) pairs,
/// and the logsumexp of the scaled scores.
fn probs(
    q: &[f32],
    k: &[f32],
    seg: &[u32],
    d: &Dims,
    b: usize,
    h: usize,
    i: usize,
) -> (Vec<(usize, f64)>, f64) {
    let hd = d.head_dim;
    let row_seg = &seg[b * d.seq..(b + 1) * d.seq];
    let qi = &q[d.q_at(b, i, h)..][..hd];
    let scores: Vec<(usize, f64)> = (0..d.seq)
        .filter(|&j| visible(i, j, row_seg, d.window))
        .map(|j| (j, dot(qi, &k[d.kv_at(b, j, h)..][..hd]) * d.scale()))
        .collect();
    let mx = scores
        .iter()
        .map(|&(_, s)| s)
        .fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = scores.iter().map(|&(_, s)| (s - mx).exp()).sum();
    let lse = mx + sum.ln();
    (
        scores
            .into_iter()
            .map(|(j, s)| (j, (s - lse).exp()))
            .collect(),
        lse,
    )
}

/// Forward: (o `[B·T, H·d]`, lse `[B, H, T]`).
pub fn forward(q: &[f32], k: &[f32], v: &[f32], seg: &[u32], d: &Dims) -> (Vec<f32>, Vec<f32>) {
    let hd = d.head_dim;
    let mut o = vec![0.0f32; d.batch * d.seq * d.heads * hd];
    let mut lse = vec![0.0f32; d.batch * d.heads * d.seq];
    for b in 0..d.batch {
        for h in 0..d.heads {
            for i in 0..d.seq {
                let (p, l) = probs(q, k, seg, d, b, h, i);
                lse[(b * d.heads + h) * d.seq + i] = l as f32;
                let out = &mut o[d.q_at(b, i, h)..][..hd];
                for (c, out) in out.iter_mut().enumerate() {
                    *out = p
                        .iter()
                        .map(|&(j, pj)| pj * v[d.kv_at(b, j, h) + c] as f64)
                        .sum::<f64>() as f32;
                }
            }
        }
    }
    (o, lse)
}

/// Backward from the output gradient `d_o`: (dq, dk, dv), dk/dv summed over each kv head's
/// group. Recomputes everything from q, k, v (no forward state).
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_o: &[f32],
    seg: &[u32],
    d: &Dims,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let hd = d.head_dim;
    let mut dq = vec![0.0f64; q.len()];
    let mut dk = vec![0.0f64; k.len()];
    let mut dv = vec![0.0f64; v.len()];
    let scale = d.scale();
    for b in 0..d.batch {
        for h in 0..d.heads {
            for i in 0..d.seq {
                let (p, _) = probs(q, k, seg, d, b, h, i);
                let qa = d.q_at(b, i, h);
                let doi = &d_o[qa..][..hd];
                // dP_j = dO_i · V_j;  dS_j = P_j (dP_j − Σ P·dP).
                let dp: Vec<f64> = p
                    .iter()
                    .map(|&(j, _)| dot(doi, &v[d.kv_at(b, j, h)..][..hd]))
                    .collect();
                let rowsum: f64 = p.iter().zip(&dp).map(|(&(_, pj), &x)| pj * x).sum();
                for (&(j, pj), &dpj) in p.iter().zip(&dp) {
                    let ka = d.kv_at(b, j, h);
                    let ds = pj * (dpj - rowsum) * scale;
                    for c in 0..hd {
                        dv[ka + c] += pj * doi[c] as f64;
                        dq[qa + c] += ds * k[ka + c] as f64;
                        dk[ka + c] += ds * q[qa + c] as f64;
                    }
                }
            }
        }
    }
    let f = |x: Vec<f64>| x.into_iter().map(|v| v as f32).collect();
    (f(dq), f(dk), f(dv))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|x| ((x as f32 + seed) * 0.731).sin()).collect()
    }

    const D: Dims = Dims {
        batch: 2,
        seq: 5,
        heads: 4,
        kv_heads: 2,
        head_dim: 3,
        window: 0,
    };

    #[test]
    fn packed_segments_and_windows_hide_keys() {
        // Row 0: one sample [0..5); row 1: two samples [0, 0, 0 | 1, 1].
        let seg = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1];
        let (q, k) = (data(40 * 3, 1.0), data(20 * 3, 2.0));
        let v = data(20 * 3, 3.0);
        let (o, lse) = forward(&q, &k, &v, &seg, &D);
        // Query 3 of row 1 starts a sample: it sees only itself, so o = v of its kv head.
        for h in 0..4 {
            let oa = D.q_at(1, 3, h);
            let va = D.kv_at(1, 3, h);
            for c in 0..3 {
                assert!((o[oa + c] - v[va + c]).abs() < 1e-6);
            }
            let s = dot(&q[oa..oa + 3], &k[va..va + 3]) * D.scale();
            assert!((lse[(4 + h) * 5 + 3] as f64 - s).abs() < 1e-6);
        }
        // Window 2: query 2 sees keys 1 and 2 only; the same as a row whose key 0 is its own
        // sample.
        let w = Dims { window: 2, ..D };
        let (ow, _) = forward(&q, &k, &v, &seg, &w);
        let seg_cut = [0, 0, 0, 0, 0, 7, 8, 8, 1, 1];
        let (oc, _) = forward(&q, &k, &v, &seg_cut, &D);
        let a = D.q_at(1, 2, 1);
        assert_eq!(&ow[a..a + 3], &oc[a..a + 3]);
    }

    #[test]
    fn backward_matches_finite_differences_of_the_forward() {
        let seg = [0, 0, 0, 0, 0, 0, 0, 1, 1, 1];
        let dims = Dims { window: 3, ..D };
        let (q, k, v) = (data(40 * 3, 1.0), data(20 * 3, 2.0), data(20 * 3, 3.0));
        let d_o = data(40 * 3, 4.0);
        let (dq, dk, dv) = backward(&q, &k, &v, &d_o, &seg, &dims);
        let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            forward(q, k, v, &seg, &dims)
                .0
                .iter()
                .zip(&d_o)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum()
        };
        let eps = 1e-2f32;
        let check = |which: usize, grad: &[f32]| {
            for idx in (0..grad.len()).step_by(7) {
                let mut x = [q.clone(), k.clone(), v.clone()];
                x[which][idx] += eps;
                let up = loss(&x[0], &x[1], &x[2]);
                x[which][idx] -= 2.0 * eps;
                let down = loss(&x[0], &x[1], &x[2]);
                let fd = (up - down) / (2.0 * eps as f64);
                assert!(
                    (fd - grad[idx] as f64).abs() < 2e-3,
                    "input {which} [{idx}]: fd {fd} vs {}",
                    grad[idx]
                );
            }
        };
        check(0, &dq);
        check(1, &dk);
        check(2, &dv);
    }
}
