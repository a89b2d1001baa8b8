//! RMSNorm forward and input gradient (the weight is frozen).

/// Returns (y, rstd) for x [rows, dim]: y = x * rstd * w, rstd = 1/sqrt(mean(x^2) + eps).
pub fn rmsnorm_fwd(x: &[f32], w: &[f32], dim: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![0.0; x.len()];
    let mut rstd = Vec::with_capacity(x.len() / dim);
    for (xr, yr) in x.chunks_exact(dim).zip(y.chunks_exact_mut(dim)) {
        let ms = xr.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / dim as f64;
        let r = 1.0 / (ms + eps as f64).sqrt();
        for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
            *o = (v as f64 * r * g as f64) as f32;
        }
        rstd.push(r as f32);
    }
    (y, rstd)
}

/// dx for x [rows, dim] given the upstream gradient dy and the forward's rstd.
pub fn rmsnorm_bwd(x: &[f32], w: &[f32], rstd: &[f32], dy: &[f32], dim: usize) -> Vec<f32> {
    let mut dx = vec![0.0; x.len()];
    for (row, ((xr, gr), dr)) in x
        .chunks_exact(dim)
        .zip(dy.chunks_exact(dim))
        .zip(dx.chunks_exact_mut(dim))
        .enumerate()
    {
        let r = rstd[row] as f64;
        let dot: f64 = xr
            .iter()
            .zip(gr)
            .zip(w)
            .map(|((&xv, &gv), &wv)| gv as f64 * wv as f64 * xv as f64 * r)
            .sum::<f64>()
            / dim as f64;
        for (((o, &xv), &gv), &wv) in dr.iter_mut().zip(xr).zip(gr).zip(w) {
            *o = (r * (gv as f64 * wv as f64 - xv as f64 * r * dot)) as f32;
        }
    }
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loss(x: &[f32], w: &[f32], dy: &[f32], dim: usize) -> f64 {
        let (y, _) = rmsnorm_fwd(x, w, dim, 1e-5);
        y.iter().zip(dy).map(|(a, b)| *a as f64 * *b as f64).sum()
    }

    #[test]
    fn backward_matches_finite_differences() {
        let dim = 6;
        let x: Vec<f32> = (0..12).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
        let w: Vec<f32> = (0..dim).map(|i| 0.5 + i as f32 / 4.0).collect();
        let dy: Vec<f32> = (0..12).map(|i| ((i * 5 % 7) as f32 - 3.0) / 2.0).collect();
        let (_, rstd) = rmsnorm_fwd(&x, &w, dim, 1e-5);
        let dx = rmsnorm_bwd(&x, &w, &rstd, &dy, dim);
        for i in 0..x.len() {
            let h = 1e-3;
            let mut xp = x.clone();
            xp[i] += h;
            let mut xm = x.clone();
            xm[i] -= h;
            let fd = (loss(&xp, &w, &dy, dim) - loss(&xm, &w, &dy, dim)) / (2.0 * h as f64);
            assert!((fd - dx[i] as f64).abs() < 2e-3, "{i}: {fd} vs {}", dx[i]);
        }
    }
}
