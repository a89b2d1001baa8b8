//! Parity checks of the LoRA dropout mask and the NF4 kernels.

use ferrotune_kernels::device::{Nf4Absmax, Nf4DoubleQuant, QuantMaps, REDUCE_PARTS};
use ferrotune_kernels::quant;
use ferrotune_kernels::reference::{bf16_round, dropout, nf4, reduce};
use rand::Rng;

use super::{bits_eq, strided_want, Checks, Gpu, Res, F32_TOL};

pub fn check_dropout(g: &mut Gpu, c: &mut Checks) -> Res<()> {
    for (n, p) in [(4096 * 24 + 8, 0.1f32), (8 * 1001, 0.5)] {
        let (threshold, scale) = dropout::dropout_params(p);
        let seed = g.rng.random::<u64>();
        let x = g.randn_bf16(n, 1.0);
        let xd = g.up_bf16(&x)?;
        let mut out = g.poison_bf16(n)?;
        g.k.dropout_apply(
            &g.stream,
            &xd.as_view(),
            &mut out.as_view_mut(),
            threshold,
            scale,
            seed,
            false,
        )?;
        let mut want = vec![0f32; n];
        dropout::dropout_apply(&x, &mut want, threshold, scale, seed, false);
        let want: Vec<f32> = want.into_iter().map(bf16_round).collect();
        let got = g.down_bf16(&out)?;
        let (a, b) = bits_eq(&got, &want);
        c.exact(&format!("dropout_apply fwd [{n}] p {p}"), &a, &b);
        let kept = got.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
        c.close(
            &format!("dropout kept fraction [{n}] p {p}"),
            &[kept as f32],
            &[1.0 - p],
            0.05,
        );
        // Backward: same mask on the gradient, added onto the base path's dX.
        let dy = g.randn_bf16(n, 0.5);
        let base = g.randn_bf16(n, 0.5);
        let dyd = g.up_bf16(&dy)?;
        let mut dx = g.up_bf16(&base)?;
        g.k.dropout_apply(
            &g.stream,
            &dyd.as_view(),
            &mut dx.as_view_mut(),
            threshold,
            scale,
            seed,
            true,
        )?;
        let mut want = base.clone();
        dropout::dropout_apply(&dy, &mut want, threshold, scale, seed, true);
        let want: Vec<f32> = want.into_iter().map(bf16_round).collect();
        let (a, b) = bits_eq(&g.down_bf16(&dx)?, &want);
        c.exact(&format!("dropout_apply bwd accumulate [{n}] p {p}"), &a, &b);
    }
    Ok(())
}

pub fn check_nf4(g: &mut Gpu, c: &mut Checks) -> Res<()> {
    let maps = QuantMaps::upload(&g.stream)?;
    for n in [64 * 5003, 4096 * 64] {
        let w = g.randn_bf16(n, 0.02);
        let wd = g.up_bf16(&w)?;
        let (mut packed, mut absmax) = (g.up(&vec![0xAAu8; n / 2])?, g.poison_f32(n / 64)?);
        g.k.nf4_quantize(
            &g.stream,
            &wd.as_view(),
            &mut packed.as_view_mut(),
            &mut absmax.as_view_mut(),
        )?;
        let (p_ref, a_ref) = nf4::nf4_quantize(&w);
        c.exact(
            &format!("nf4_quantize codes [{n}]"),
            &g.down(&packed)?,
            &p_ref,
        );
        let (a, b) = bits_eq(&g.down(&absmax)?, &a_ref);
        c.exact(&format!("nf4_quantize absmax [{}]", n / 64), &a, &b);
        let mut out = g.poison_bf16(n)?;
        g.k.nf4_dequantize(
            &g.stream,
            &packed.as_view(),
            Nf4Absmax::Plain(&absmax.as_view()),
            &mut out.as_view_mut(),
        )?;
        let deq: Vec<f32> = nf4::nf4_dequantize(&p_ref, &a_ref)
            .into_iter()
            .map(bf16_round)
            .collect();
        let (a, b) = bits_eq(&g.down_bf16(&out)?, &deq);
        c.exact(&format!("nf4_dequantize [{n}]"), &a, &b);
        c.close(
            &format!("nf4 round trip vs bf16 weights [{n}]"),
            &deq,
            &w,
            0.12,
        );

        // Double quantisation of the absmax values.
        let nb = n / 64;
        let mut parts = g.poison_f32(REDUCE_PARTS)?;
        let mut offset = g.poison_f32(1)?;
        let (mut qa, mut a2) = (g.up(&vec![0u8; nb])?, g.poison_f32(nb.div_ceil(256))?);
        g.k.nf4_double_quantize(
            &g.stream,
            &absmax.as_view(),
            &maps,
            &mut parts.as_view_mut(),
            &mut offset.as_view_mut(),
            &mut qa.as_view_mut(),
            &mut a2.as_view_mut(),
        )?;
        let off = g.down(&offset)?[0];
        let mean = (reduce::sum(&a_ref) / nb as f64) as f32;
        c.close(
            &format!("nf4 double-quant offset (mean of {nb})"),
            &[off],
            &[mean],
            F32_TOL,
        );
        let (q_ref, a2_ref) = nf4::quantize_blockwise_8bit(&a_ref, off, quant::signed_map());
        c.exact(
            &format!("quantize_blockwise_8bit codes [{nb}]"),
            &g.down(&qa)?,
            &q_ref,
        );
        let (a, b) = bits_eq(&g.down(&a2)?, &a2_ref);
        c.exact(
            &format!("quantize_blockwise_8bit absmax2 [{}]", a2_ref.len()),
            &a,
            &b,
        );
        let dq = Nf4DoubleQuant {
            qabsmax: qa.as_view(),
            absmax2: a2.as_view(),
            offset: offset.as_view(),
        };
        let mut out2 = g.poison_bf16(n)?;
        g.k.nf4_dequantize(
            &g.stream,
            &packed.as_view(),
            Nf4Absmax::Double(&dq, &maps),
            &mut out2.as_view_mut(),
        )?;
        let absmax_dq = nf4::dequantize_absmax(&q_ref, &a2_ref, quant::signed_map(), off);
        let deq2: Vec<f32> = nf4::nf4_dequantize(&p_ref, &absmax_dq)
            .into_iter()
            .map(bf16_round)
            .collect();
        let (a, b) = bits_eq(&g.down_bf16(&out2)?, &deq2);
        c.exact(&format!("nf4_dequantize_dq [{n}]"), &a, &b);
        // Rows of 4096 (or 64) values, 16 more apart, at 16 in and at 0: the layouts of the
        // folded gate and up weights.
        let cols = if n.is_multiple_of(4096) { 4096 } else { 64 };
        let ld = cols + 16;
        for at in [16, 0] {
            let len = n / cols * ld;
            let mut rows = g.poison_bf16(len)?;
            g.k.nf4_dequantize_rows(
                &g.stream,
                &packed.as_view(),
                Nf4Absmax::Double(&dq, &maps),
                (&mut rows.slice_mut(at..), cols, ld),
                n,
            )?;
            let want = strided_want(&deq2, cols, ld, at, len);
            let (a, b) = bits_eq(&g.down_bf16(&rows)?, &want);
            c.exact(
                &format!("nf4_dequantize_dq [{n}] rows of {cols} {ld} apart at {at}"),
                &a,
                &b,
            );
        }
    }
    Ok(())
}
