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

#[cfg(test)]
mod tests {
    use super::*;

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
