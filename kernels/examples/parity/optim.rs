//! Parity checks of the optimizer and reduction kernels.

use ferrotune_kernels::device::{Adam8bitStates, QuantMaps, REDUCE_PARTS};
use ferrotune_kernels::reference::adamw::{self as radam, Adam8bitState, AdamStep};
use ferrotune_kernels::reference::{bf16_round, reduce};

use super::{bits_eq, Checks, Gpu, Res, BETAS, F32_TOL};

pub fn check_adamw(g: &mut Gpu, c: &mut Checks) -> Res<()> {
    let n = 100_003;
    let grads = g.randn(n, 0.05);
    let gd = g.up(&grads)?;
    // Global norm and clip coefficient on the device.
    let mut parts = g.poison_f32(REDUCE_PARTS)?;
    let (mut normd, mut coefd) = (g.poison_f32(1)?, g.poison_f32(1)?);
    g.k.grad_norm(
        &g.stream,
        &gd.as_view(),
        1.0,
        &mut parts.as_view_mut(),
        &mut normd.as_view_mut(),
        &mut coefd.as_view_mut(),
    )?;
    let norm_ref = reduce::sum_sq(&grads).sqrt() as f32;
    let (normg, coefg) = (g.down(&normd)?[0], g.down(&coefd)?[0]);
    c.close(&format!("grad_norm [{n}]"), &[normg], &[norm_ref], F32_TOL);
    c.close(
        "grad_norm clip coef (max_norm 1)",
        &[coefg],
        &[reduce::clip_coef(norm_ref, 1.0)],
        F32_TOL,
    );
    assert!(coefg < 1.0, "the test gradients should be clipped");

    // Stacked dA blocks added into three gradients of one arena (at uneven offsets), bitwise
    // the host's fp32 adds; the arena's other values untouched.
    let (blk, at) = (1_000usize, [0usize, 1_256, 3_000]);
    let src = g.randn(3 * blk, 0.05);
    let arena = g.randn(4_000, 0.05);
    let (srcd, mut arenad) = (g.up(&src)?, g.up(&arena)?);
    {
        let (mut a, mut rest) = arenad.split_at_mut(at[1]);
        let (mut b, mut c2) = rest.split_at_mut(at[2] - at[1]);
        let mut dsts = [a.slice_mut(..blk), b.slice_mut(..blk), c2.slice_mut(..blk)];
        g.k.add_blocks_f32(&g.stream, &srcd.as_view(), &mut dsts)?;
    }
    let mut want = arena.clone();
    for (p, &o) in at.iter().enumerate() {
        for i in 0..blk {
            want[o + i] += src[p * blk + i];
        }
    }
    let (a, b) = bits_eq(&g.down(&arenad)?, &want);
    c.exact(&format!("add_blocks_f32 3x[{blk}]"), &a, &b);

    for bnb in [false, true] {
        let mut p = g.randn(n, 0.1);
        let mut m = g.randn(n, 0.01);
        let mut v: Vec<f32> = g.randn(n, 1e-3).into_iter().map(|x| x * x).collect();
        let (mut pd, mut md, mut vd) = (g.up(&p)?, g.up(&m)?, g.up(&v)?);
        let mut shadow = g.poison_bf16(n)?;
        for t in 1..=3 {
            let s = if bnb {
                AdamStep::bitsandbytes(t, 2e-4, 0.01, BETAS, 1e-8)
            } else {
                AdamStep::torch(t, 2e-4, 0.01, BETAS, 1e-8)
            };
            g.k.adamw_fp32(
                &g.stream,
                &mut pd.as_view_mut(),
                &gd.as_view(),
                &mut md.as_view_mut(),
                &mut vd.as_view_mut(),
                &s,
                Some(&coefd.as_view()),
                Some(&mut shadow.as_view_mut()),
            )?;
            radam::adamw_fp32(&mut p, &grads, &mut m, &mut v, &s, coefg);
        }
        let tag = if bnb {
            "bitsandbytes order"
        } else {
            "torch order"
        };
        let (a, b) = bits_eq(&g.down(&pd)?, &p);
        c.exact(&format!("adamw_fp32 params, 3 steps, {tag}"), &a, &b);
        let (a, b) = bits_eq(&g.down(&vd)?, &v);
        c.exact(&format!("adamw_fp32 v, 3 steps, {tag}"), &a, &b);
        let want: Vec<f32> = p.iter().map(|&x| bf16_round(x)).collect();
        let (a, b) = bits_eq(&g.down_bf16(&shadow)?, &want);
        c.exact(&format!("adamw_fp32 bf16 shadow, {tag}"), &a, &b);
    }

    let n8 = 256 * 300 + 77;
    let maps = QuantMaps::upload(&g.stream)?;
    let mut p = g.randn(n8, 0.1);
    let mut pd = g.up(&p)?;
    let mut st = Adam8bitState::zeros(n8);
    let mut mc = g.up(&st.m_codes)?;
    let mut ma = g.up(&st.m_absmax)?;
    let mut vc = g.up(&st.v_codes)?;
    let mut va = g.up(&st.v_absmax)?;
    let mut shadow = g.poison_bf16(n8)?;
    for t in 1..=3 {
        let mut gr = g.randn(n8, 0.05);
        gr[1234] = f32::NAN; // skipped by bitsandbytes semantics
        let grd = g.up(&gr)?;
        let s = AdamStep::bitsandbytes(t, 2e-4, 0.01, BETAS, 1e-8);
        let mut states = Adam8bitStates {
            m_codes: mc.as_view_mut(),
            m_absmax: ma.as_view_mut(),
            v_codes: vc.as_view_mut(),
            v_absmax: va.as_view_mut(),
        };
        g.k.adamw_8bit(
            &g.stream,
            &mut pd.as_view_mut(),
            &grd.as_view(),
            &mut states,
            &maps,
            &s,
            None,
            Some(&mut shadow.as_view_mut()),
        )?;
        radam::adamw_8bit(&mut p, &gr, &mut st, &s, 1.0);
    }
    let (a, b) = bits_eq(&g.down(&pd)?, &p);
    c.exact(&format!("adamw_8bit params, 3 steps [{n8}]"), &a, &b);
    c.exact("adamw_8bit m codes", &g.down(&mc)?, &st.m_codes);
    c.exact("adamw_8bit v codes", &g.down(&vc)?, &st.v_codes);
    let (a, b) = bits_eq(&g.down(&ma)?, &st.m_absmax);
    c.exact("adamw_8bit m absmax", &a, &b);
    let (a, b) = bits_eq(&g.down(&va)?, &st.v_absmax);
    c.exact("adamw_8bit v absmax", &a, &b);
    let want: Vec<f32> = p.iter().map(|&x| bf16_round(x)).collect();
    let (a, b) = bits_eq(&g.down_bf16(&shadow)?, &want);
    c.exact("adamw_8bit bf16 shadow", &a, &b);
    Ok(())
}
