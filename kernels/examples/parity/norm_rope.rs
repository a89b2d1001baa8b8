//! Parity checks of the RMSNorm and RoPE kernels.

use cudarc::driver::CudaSlice;
use ferrotune_kernels::device::bf16;
use ferrotune_kernels::reference::{bf16_round, norm, rope};
use ferrotune_kernels::rope::{inv_freq, Llama3Scaling};
use rand::Rng;

use super::{bits_eq, strided_want, Checks, Gpu, Res, BF16_TOL, F32_TOL};

pub fn check_rmsnorm(g: &mut Gpu, c: &mut Checks) -> Res<()> {
    for (rows, dim) in [(37, 4096), (5, 136), (300, 8192), (64, 128)] {
        let x = g.randn_bf16(rows * dim, 2.0);
        let w: Vec<f32> = g
            .randn(dim, 0.2)
            .into_iter()
            .map(|v| bf16_round(1.0 + v))
            .collect();
        let (xd, wd) = (g.up_bf16(&x)?, g.up_bf16(&w)?);
        let mut y = g.poison_bf16(rows * dim)?;
        let mut rstd = g.poison_f32(rows)?;
        g.k.rmsnorm_fwd(
            &g.stream,
            &xd.as_view(),
            &wd.as_view(),
            (&mut y.as_view_mut(), dim),
            &mut rstd.as_view_mut(),
            rows,
            dim,
            1e-5,
        )?;
        let (y_ref, rstd_ref) = norm::rmsnorm_fwd(&x, &w, dim, 1e-5);
        c.close(
            &format!("rmsnorm_fwd y [{rows}x{dim}]"),
            &g.down_bf16(&y)?,
            &y_ref,
            BF16_TOL,
        );
        let rstd_gpu = g.down(&rstd)?;
        c.close(
            &format!("rmsnorm_fwd rstd [{rows}]"),
            &rstd_gpu,
            &rstd_ref,
            F32_TOL,
        );
        // Into rows 32 apart, 16 in (the MLP's norm between the folded LoRA columns): the
        // same values, nothing else written.
        let (ld, at) = (dim + 32, 16);
        let mut ys = g.poison_bf16(rows * ld)?;
        g.k.rmsnorm_fwd(
            &g.stream,
            &xd.as_view(),
            &wd.as_view(),
            (&mut ys.slice_mut(at..), ld),
            &mut rstd.as_view_mut(),
            rows,
            dim,
            1e-5,
        )?;
        let want = strided_want(&g.down_bf16(&y)?, dim, ld, at, rows * ld);
        let (a, b) = bits_eq(&g.down_bf16(&ys)?, &want);
        c.exact(
            &format!("rmsnorm_fwd y [{rows}x{dim}] rows {ld} apart"),
            &a,
            &b,
        );

        let dy = g.randn_bf16(rows * dim, 0.5);
        let res = g.randn_bf16(rows * dim, 0.5);
        let dyd = g.up_bf16(&dy)?;
        let dx_ref = norm::rmsnorm_bwd(&x, &w, &rstd_gpu, &dy, dim);
        // dx (rows `ld` apart) = or += the gradient.
        let bwd = |dx: &mut CudaSlice<bf16>, ld: usize, accumulate: bool| {
            g.k.rmsnorm_bwd(
                &g.stream,
                &xd.as_view(),
                &wd.as_view(),
                &rstd.as_view(),
                &dyd.as_view(),
                (&mut dx.as_view_mut(), ld),
                rows,
                dim,
                accumulate,
            )
        };
        let mut dx = g.poison_bf16(rows * dim)?;
        bwd(&mut dx, dim, false)?;
        c.close(
            &format!("rmsnorm_bwd dx [{rows}x{dim}]"),
            &g.down_bf16(&dx)?,
            &dx_ref,
            BF16_TOL,
        );
        // Accumulating into an existing residual gradient.
        let mut acc = g.up_bf16(&res)?;
        bwd(&mut acc, dim, true)?;
        let want: Vec<f32> = res.iter().zip(&dx_ref).map(|(a, b)| a + b).collect();
        c.close(
            &format!("rmsnorm_bwd dx += [{rows}x{dim}]"),
            &g.down_bf16(&acc)?,
            &want,
            BF16_TOL,
        );
        // The same into rows 16 apart (the residual gradient's spare columns for the folded
        // input gradients): bit for bit the dense result, nothing else written.
        let ld = dim + 16;
        let mut accs = g.up_bf16(&strided_want(&res, dim, ld, 0, rows * ld))?;
        bwd(&mut accs, ld, true)?;
        let want = strided_want(&g.down_bf16(&acc)?, dim, ld, 0, rows * ld);
        let (a, b) = bits_eq(&g.down_bf16(&accs)?, &want);
        c.exact(
            &format!("rmsnorm_bwd dx += [{rows}x{dim}] rows {ld} apart"),
            &a,
            &b,
        );
    }
    Ok(())
}

pub fn check_rope(g: &mut Gpu, c: &mut Checks) -> Res<()> {
    let scaling = Llama3Scaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    };
    for (tokens, hq, hk, d, pos_max) in [
        (77usize, 32usize, 8usize, 128usize, 8192u32),
        (19, 4, 2, 64, 200_000),
    ] {
        let inv = inv_freq(d, 500_000.0, Some(&scaling));
        // Packed samples: positions restart inside the batch.
        let pos: Vec<u32> = (0..tokens)
            .map(|t| {
                if t < tokens / 3 {
                    t as u32
                } else {
                    g.rng.random_range(0..pos_max)
                }
            })
            .collect();
        let (pd, invd) = (g.up(&pos)?, g.up(&inv)?);
        let half = d / 2;
        let mut cos = g.poison_f32(tokens * half)?;
        let mut sin = g.poison_f32(tokens * half)?;
        g.k.rope_cos_sin(
            &g.stream,
            &pd.as_view(),
            &invd.as_view(),
            &mut cos.as_view_mut(),
            &mut sin.as_view_mut(),
        )?;
        let (c_ref, s_ref) = rope::cos_sin(&pos, &inv);
        let (cg, sg) = (g.down(&cos)?, g.down(&sin)?);
        c.close(
            &format!("rope_cos_sin cos [{tokens}x{half}] pos<{pos_max}"),
            &cg,
            &c_ref,
            F32_TOL,
        );
        c.close(
            &format!("rope_cos_sin sin [{tokens}x{half}] pos<{pos_max}"),
            &sg,
            &s_ref,
            F32_TOL,
        );
        // Padded row strides, as inside a fused qkv buffer.
        let (qs, ks) = (hq * d + 3 * d, hk * d + 2 * d);
        for inverse in [false, true] {
            let q = g.randn_bf16(tokens * qs, 1.0);
            let k = g.randn_bf16(tokens * ks, 1.0);
            let (mut qd, mut kd) = (g.up_bf16(&q)?, g.up_bf16(&k)?);
            g.k.rope_apply(
                &g.stream,
                &mut qd.as_view_mut(),
                qs,
                hq,
                Some((&mut kd.as_view_mut(), ks, hk)),
                &cos.as_view(),
                &sin.as_view(),
                tokens,
                d,
                inverse,
            )?;
            let dir = if inverse { -1.0 } else { 1.0 };
            let (mut qr, mut kr) = (q.clone(), k.clone());
            rope::apply(&mut qr, qs, hq, d, &cg, &sg, tokens, dir);
            rope::apply(&mut kr, ks, hk, d, &cg, &sg, tokens, dir);
            let tag = if inverse { "bwd" } else { "fwd" };
            c.close(
                &format!("rope_apply {tag} q [{tokens}x{hq}x{d}]"),
                &g.down_bf16(&qd)?,
                &qr,
                BF16_TOL,
            );
            c.close(
                &format!("rope_apply {tag} k [{tokens}x{hk}x{d}]"),
                &g.down_bf16(&kd)?,
                &kr,
                BF16_TOL,
            );
        }
    }
    Ok(())
}
