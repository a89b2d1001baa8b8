//! SwiGLU activation h = silu(g) * u and its gradients.

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

pub fn swiglu_fwd(g: &[f32], u: &[f32]) -> Vec<f32> {
    g.iter()
        .zip(u)
        .map(|(&g, &u)| (g as f64 * sigmoid(g as f64) * u as f64) as f32)
        .collect()
}

/// Returns (dg, du, h).
pub fn swiglu_bwd(dh: &[f32], g: &[f32], u: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dg = Vec::with_capacity(g.len());
    let mut du = Vec::with_capacity(g.len());
    let mut h = Vec::with_capacity(g.len());
    for ((&d, &g), &u) in dh.iter().zip(g).zip(u) {
        let (d, g, u) = (d as f64, g as f64, u as f64);
        let s = sigmoid(g);
        h.push((g * s * u) as f32);
        du.push((d * g * s) as f32);
        dg.push((d * u * s * (1.0 + g * (1.0 - s))) as f32);
    }
    (dg, du, h)
}

/// One adapter's products from its output gradient `dy` `[rows, cols]`: `t = dy·B` `[rows, r]`
/// and `dyᵀ·low` `[cols, r]` (the `dB` term before the scale), with `B` `[cols, r]` and `low`
/// rows `low_ld` apart; in f64.
pub fn lora_products(
    dy: &[f32],
    (rows, cols): (usize, usize),
    b: &[f32],
    (low, low_ld): (&[f32], usize),
    r: usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut t = vec![0f64; rows * r];
    let mut db = vec![0f64; cols * r];
    for n in 0..rows {
        for c in 0..cols {
            let y = dy[n * cols + c] as f64;
            for j in 0..r {
                t[n * r + j] += y * b[c * r + j] as f64;
                db[c * r + j] += y * low[n * low_ld + j] as f64;
            }
        }
    }
    let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
    (f32s(t), f32s(db))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_products_multiply_the_right_axes() {
        // dy [2, 3], B [3, 1], low [2, 1] with a row stride of 2.
        let dy = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let (t, db) = lora_products(
            &dy,
            (2, 3),
            &[1.0, 0.0, -1.0],
            (&[2.0, 9.0, -1.0, 9.0], 2),
            1,
        );
        assert_eq!(t, vec![1.0 - 3.0, 4.0 - 6.0]);
        assert_eq!(db, vec![2.0 - 4.0, 4.0 - 5.0, 6.0 - 6.0]);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let g = [-3.0f32, -0.5, 0.0, 0.7, 4.0];
        let u = [0.3f32, -1.2, 2.0, 0.9, -0.4];
        let dh = [1.0f32, -0.5, 0.25, 2.0, -1.5];
        let (dg, du, h) = swiglu_bwd(&dh, &g, &u);
        assert_eq!(h, swiglu_fwd(&g, &u));
        let f = |g: f64, u: f64| g * sigmoid(g) * u;
        for i in 0..g.len() {
            let e = 1e-4;
            let (gi, ui) = (g[i] as f64, u[i] as f64);
            let fdg = (f(gi + e, ui) - f(gi - e, ui)) / (2.0 * e) * dh[i] as f64;
            let fdu = (f(gi, ui + e) - f(gi, ui - e)) / (2.0 * e) * dh[i] as f64;
            assert!((fdg - dg[i] as f64).abs() < 1e-5, "dg {i}");
            assert!((fdu - du[i] as f64).abs() < 1e-5, "du {i}");
        }
    }
}
