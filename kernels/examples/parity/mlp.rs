//! Parity checks of the SwiGLU kernels and the adapters' one-pass `t`/`dB` (`swiglu.cu`).

use ferrotune_kernels::device::LoraAdapter;
use ferrotune_kernels::reference::swiglu;

use super::{Checks, Gpu, Res, BF16_TOL};

pub fn check_swiglu(g: &mut Gpu, c: &mut Checks) -> Res<()> {
    for (rows, cols, pad) in [(33usize, 14336usize, 0usize), (7, 8 * 37, 16)] {
        let s = cols + pad;
        let gate = g.randn_bf16(rows * s, 2.0);
        let up = g.randn_bf16(rows * s, 1.0);
        let (gd, ud) = (g.up_bf16(&gate)?, g.up_bf16(&up)?);
        let mut h = g.poison_bf16(rows * s)?;
        g.k.swiglu_fwd(
            &g.stream,
            (&gd.as_view(), s),
            (&ud.as_view(), s),
            (&mut h.as_view_mut(), s),
            rows,
            cols,
        )?;
        let strip =
            |v: &[f32]| -> Vec<f32> { v.chunks(s).flat_map(|r| r[..cols].to_vec()).collect() };
        let (gs, us) = (strip(&gate), strip(&up));
        c.close(
            &format!("swiglu_fwd h [{rows}x{cols}] stride {s}"),
            &strip(&g.down_bf16(&h)?),
            &swiglu::swiglu_fwd(&gs, &us),
            BF16_TOL,
        );

        let dh = g.randn_bf16(rows * s, 0.5);
        let dhd = g.up_bf16(&dh)?;
        let (mut gg, mut uu) = (g.up_bf16(&gate)?, g.up_bf16(&up)?);
        let mut h2 = g.poison_bf16(rows * s)?;
        g.k.swiglu_bwd(
            &g.stream,
            (&dhd.as_view(), s),
            (&mut gg.as_view_mut(), s),
            (&mut uu.as_view_mut(), s),
            Some((&mut h2.as_view_mut(), s)),
            rows,
            cols,
        )?;
        let (dg, du, hr) = swiglu::swiglu_bwd(&strip(&dh), &gs, &us);
        c.close(
            &format!("swiglu_bwd dg [{rows}x{cols}]"),
            &strip(&g.down_bf16(&gg)?),
            &dg,
            BF16_TOL,
        );
        c.close(
            &format!("swiglu_bwd du [{rows}x{cols}]"),
            &strip(&g.down_bf16(&uu)?),
            &du,
            BF16_TOL,
        );
        c.close(
            &format!("swiglu_bwd h [{rows}x{cols}]"),
            &strip(&g.down_bf16(&h2)?),
            &hr,
            BF16_TOL,
        );
    }
    Ok(())
}

/// The SwiGLU backward fused with the gate/up adapters' products: its dg, du, h as
/// `swiglu_bwd`'s, `t` and `dB` against the products of the dg/du it stored, `t_acc` left zero.
/// Shapes with row and column tails (neither a multiple of 64), strided inputs and `low`s
/// rows apart as in the engine's MLP norm buffer.
pub fn check_swiglu_lora(g: &mut Gpu, c: &mut Checks) -> Res<()> {
    for (rows, cols, r) in [
        (130usize, 8 * 37usize, 16usize),
        (257, 1024, 32),
        (70, 320, 64),
        (4100, 256, 16),
    ] {
        let s = cols + 8;
        let (dh, gate, up) = (
            g.randn_bf16(rows * s, 0.5),
            g.randn_bf16(rows * s, 2.0),
            g.randn_bf16(rows * s, 1.0),
        );
        let (dhd, mut gd, mut ud) = (g.up_bf16(&dh)?, g.up_bf16(&gate)?, g.up_bf16(&up)?);
        let mut hd = g.poison_bf16(rows * s)?;
        let low_ld = 3 * r + 8;
        let (bs, lows): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (0..2)
            .map(|_| {
                (
                    g.randn_bf16(cols * r, 0.3),
                    g.randn_bf16(rows * low_ld, 1.0),
                )
            })
            .unzip();
        let dbs0: Vec<Vec<f32>> = (0..2).map(|_| g.randn(cols * r, 1.0)).collect();
        let (b_dev, low_dev) = (
            [g.up_bf16(&bs[0])?, g.up_bf16(&bs[1])?],
            [g.up_bf16(&lows[0])?, g.up_bf16(&lows[1])?],
        );
        let mut db_dev = [g.up(&dbs0[0])?, g.up(&dbs0[1])?];
        let mut t_acc = g.up(&vec![0f32; rows * 2 * r])?;
        let scale = 0.75f32;
        {
            let [db0, db1] = &mut db_dev;
            let mut gate_a = LoraAdapter {
                b: b_dev[0].as_view(),
                low: (low_dev[0].as_view(), low_ld),
                grad_b: db0.as_view_mut(),
            };
            let mut up_a = LoraAdapter {
                b: b_dev[1].as_view(),
                low: (low_dev[1].as_view(), low_ld),
                grad_b: db1.as_view_mut(),
            };
            g.k.swiglu_lora_bwd(
                &g.stream,
                (&dhd.as_view(), s),
                (&mut gd.as_view_mut(), s),
                (&mut ud.as_view_mut(), s),
                (&mut hd.as_view_mut(), s),
                [&mut gate_a, &mut up_a],
                &mut t_acc.as_view_mut(),
                (r, scale),
                rows,
                cols,
            )?;
        }
        let t_ld = 2 * r + 8;
        let mut t = g.poison_bf16(rows * t_ld)?;
        g.k.lora_t_store(
            &g.stream,
            &mut t_acc.as_view_mut(),
            (&mut t.as_view_mut(), t_ld),
            (rows, 2 * r),
            1.0,
        )?;

        let strip = |v: &[f32], w: usize, ld: usize| -> Vec<f32> {
            v.chunks(ld).flat_map(|x| x[..w].to_vec()).collect()
        };
        let (dg_want, du_want, h_want) = swiglu::swiglu_bwd(
            &strip(&dh, cols, s),
            &strip(&gate, cols, s),
            &strip(&up, cols, s),
        );
        let (dg, du) = (
            strip(&g.down_bf16(&gd)?, cols, s),
            strip(&g.down_bf16(&ud)?, cols, s),
        );
        let name = format!("swiglu_lora_bwd [{rows}x{cols}] r{r}");
        c.close(&format!("{name} dg"), &dg, &dg_want, BF16_TOL);
        c.close(&format!("{name} du"), &du, &du_want, BF16_TOL);
        c.close(
            &format!("{name} h"),
            &strip(&g.down_bf16(&hd)?, cols, s),
            &h_want,
            BF16_TOL,
        );
        let t_got = g.down_bf16(&t)?;
        for (p, (dy, which)) in [(&dg, "gate"), (&du, "up")].into_iter().enumerate() {
            let (t_want, db_term) =
                swiglu::lora_products(dy, (rows, cols), &bs[p], (&lows[p], low_ld), r);
            let t_p: Vec<f32> = t_got
                .chunks(t_ld)
                .flat_map(|x| x[p * r..(p + 1) * r].to_vec())
                .collect();
            c.close(&format!("{name} {which} t"), &t_p, &t_want, BF16_TOL);
            let db_want: Vec<f32> = dbs0[p]
                .iter()
                .zip(&db_term)
                .map(|(a, b)| a + scale * b)
                .collect();
            c.close(
                &format!("{name} {which} dB"),
                &g.down(&db_dev[p])?,
                &db_want,
                1e-4,
            );
        }
        c.exact(
            &format!("{name} t_acc zeroed"),
            &g.down(&t_acc)?,
            &vec![0f32; rows * 2 * r],
        );
    }
    Ok(())
}

/// One adapter's `t` and `dB` in one pass over a `dy` in memory (`lora_tdb`), `t` rounded with
/// an `alpha` by `lora_t_store` into a strided buffer: against the f64 products. Shapes with
/// row and column tails, `dy` rows apart as the residual gradient's spare columns make them,
/// `low`s side by side as the stacked q/k/v keep them.
pub fn check_lora_tdb(g: &mut Gpu, c: &mut Checks) -> Res<()> {
    for (rows, cols, r) in [
        (130usize, 8 * 37usize, 16usize),
        (257, 1024, 32),
        (70, 320, 64),
        (4100, 4096, 16),
    ] {
        let dy_ld = cols + r;
        let dy = g.randn_bf16(rows * dy_ld, 0.5);
        let (b, low_ld) = (g.randn_bf16(cols * r, 0.3), 3 * r);
        let low = g.randn_bf16(rows * low_ld, 1.0);
        let db0 = g.randn(cols * r, 1.0);
        let (dy_dev, b_dev, low_dev) = (g.up_bf16(&dy)?, g.up_bf16(&b)?, g.up_bf16(&low)?);
        let mut db_dev = g.up(&db0)?;
        let mut t_acc = g.up(&vec![0f32; rows * r])?;
        let (scale, alpha) = (0.75f32, 2.0f32);
        g.k.lora_tdb(
            &g.stream,
            (&dy_dev.as_view(), dy_ld),
            &mut LoraAdapter {
                b: b_dev.as_view(),
                low: (low_dev.as_view(), low_ld),
                grad_b: db_dev.as_view_mut(),
            },
            &mut t_acc.as_view_mut(),
            (r, scale),
            rows,
            cols,
        )?;
        let t_ld = r + 8;
        let mut t = g.poison_bf16(rows * t_ld)?;
        g.k.lora_t_store(
            &g.stream,
            &mut t_acc.as_view_mut(),
            (&mut t.as_view_mut(), t_ld),
            (rows, r),
            alpha,
        )?;
        let dy_dense: Vec<f32> = dy.chunks(dy_ld).flat_map(|x| x[..cols].to_vec()).collect();
        let (t_want, db_term) =
            swiglu::lora_products(&dy_dense, (rows, cols), &b, (&low, low_ld), r);
        let t_want: Vec<f32> = t_want.iter().map(|x| alpha * x).collect();
        let name = format!("lora_tdb [{rows}x{cols}] r{r}");
        let t_got: Vec<f32> = g
            .down_bf16(&t)?
            .chunks(t_ld)
            .flat_map(|x| x[..r].to_vec())
            .collect();
        c.close(&format!("{name} t"), &t_got, &t_want, BF16_TOL);
        let db_want: Vec<f32> = db0
            .iter()
            .zip(&db_term)
            .map(|(a, b)| a + scale * b)
            .collect();
        c.close(&format!("{name} dB"), &g.down(&db_dev)?, &db_want, 1e-4);
        c.exact(
            &format!("{name} t_acc zeroed"),
            &g.down(&t_acc)?,
            &vec![0f32; rows * r],
        );
    }
    Ok(())
}
