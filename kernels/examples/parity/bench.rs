//! `--bench`: the memory-bound kernels timed at Llama-3-8B shapes (CUDA events).

use ferrotune_kernels::device::{
    Adam8bitStates, CrossEntropyRows, LoraAdapter, Nf4Absmax, QuantMaps, REDUCE_PARTS,
};
use ferrotune_kernels::reference::adamw::AdamStep;
use ferrotune_kernels::reference::dropout;
use ferrotune_kernels::rope::inv_freq;

use super::{time_ms, Gpu, Res, BETAS};

pub fn bench(g: &mut Gpu) -> Res<()> {
    println!("\nbench (Llama-3-8B shapes, batch 2 x 2048 = 4096 tokens); GB/s counts each input read once and each output written once");
    let report = |name: &str, ms: f32, bytes: f64| {
        println!(
            "bench {name:<48} {ms:>8.4} ms  {:>7.0} GB/s",
            bytes / (ms as f64 * 1e-3) / 1e9
        )
    };
    let (t, d, inter, v) = (4096usize, 4096usize, 14336usize, 128256usize);
    let x = g.rand_bf16_dev(t * d, 1.0)?;
    let w = g.rand_bf16_dev(d, 1.0)?;
    let mut y = g.poison_bf16(t * d)?;
    let mut rstd = g.poison_f32(t)?;
    let ms = time_ms(g, || {
        Ok(g.k.rmsnorm_fwd(
            &g.stream,
            &x.as_view(),
            &w.as_view(),
            (&mut y.as_view_mut(), d),
            &mut rstd.as_view_mut(),
            t,
            d,
            1e-5,
        )?)
    })?;
    report("rmsnorm_fwd 4096x4096", ms, (2 * t * d * 2) as f64);
    let dy = g.rand_bf16_dev(t * d, 1.0)?;
    let ms = time_ms(g, || {
        Ok(g.k.rmsnorm_bwd(
            &g.stream,
            &x.as_view(),
            &w.as_view(),
            &rstd.as_view(),
            &dy.as_view(),
            (&mut y.as_view_mut(), d),
            t,
            d,
            false,
        )?)
    })?;
    report("rmsnorm_bwd 4096x4096", ms, (3 * t * d * 2) as f64);
    let gate = g.rand_bf16_dev(t * inter, 1.0)?;
    let up = g.rand_bf16_dev(t * inter, 1.0)?;
    let mut h = g.poison_bf16(t * inter)?;
    let ms = time_ms(g, || {
        Ok(g.k.swiglu_fwd(
            &g.stream,
            (&gate.as_view(), inter),
            (&up.as_view(), inter),
            (&mut h.as_view_mut(), inter),
            t,
            inter,
        )?)
    })?;
    report("swiglu_fwd 4096x14336", ms, (3 * t * inter * 2) as f64);
    let (mut gg, mut uu) = (
        g.rand_bf16_dev(t * inter, 1.0)?,
        g.rand_bf16_dev(t * inter, 1.0)?,
    );
    let ms = time_ms(g, || {
        Ok(g.k.swiglu_bwd(
            &g.stream,
            (&h.as_view(), inter),
            (&mut gg.as_view_mut(), inter),
            (&mut uu.as_view_mut(), inter),
            None,
            t,
            inter,
        )?)
    })?;
    report(
        "swiglu_bwd 4096x14336 (in place, no h)",
        ms,
        (5 * t * inter * 2) as f64,
    );
    // The SwiGLU backward with gate's and up's t and dB (r 16) at 8B's and 1B's MLP widths.
    for cols in [inter, 8192] {
        let r = 16;
        let dh = g.rand_bf16_dev(t * cols, 1.0)?;
        let (mut gg, mut uu) = (
            g.rand_bf16_dev(t * cols, 1.0)?,
            g.rand_bf16_dev(t * cols, 1.0)?,
        );
        let mut hh = g.poison_bf16(t * cols)?;
        let bs = [
            g.rand_bf16_dev(cols * r, 1.0)?,
            g.rand_bf16_dev(cols * r, 1.0)?,
        ];
        let lows = [g.rand_bf16_dev(t * r, 1.0)?, g.rand_bf16_dev(t * r, 1.0)?];
        let mut dbs = [g.up(&vec![0f32; cols * r])?, g.up(&vec![0f32; cols * r])?];
        let mut t_acc = g.up(&vec![0f32; t * 2 * r])?;
        let ms = time_ms(g, || {
            let [db0, db1] = &mut dbs;
            Ok(g.k.swiglu_lora_bwd(
                &g.stream,
                (&dh.as_view(), cols),
                (&mut gg.as_view_mut(), cols),
                (&mut uu.as_view_mut(), cols),
                (&mut hh.as_view_mut(), cols),
                [
                    &mut LoraAdapter {
                        b: bs[0].as_view(),
                        low: (lows[0].as_view(), r),
                        grad_b: db0.as_view_mut(),
                    },
                    &mut LoraAdapter {
                        b: bs[1].as_view(),
                        low: (lows[1].as_view(), r),
                        grad_b: db1.as_view_mut(),
                    },
                ],
                &mut t_acc.as_view_mut(),
                (r, 1.0),
                t,
                cols,
            )?)
        })?;
        report(
            &format!("swiglu_lora_bwd 4096x{cols} r16"),
            ms,
            (6 * t * cols * 2) as f64,
        );
    }
    // One adapter's t and dB (r 16) over the residual gradient (o, down: spare columns) and
    // over k/v's gradient; its t rounded by lora_t_store. The two GEMMs it replaces read dy
    // twice.
    for (cols, ld) in [(d, d + 16), (1024, 1024)] {
        let r = 16;
        let dy = g.rand_bf16_dev(t * ld, 1.0)?;
        let (b, low) = (
            g.rand_bf16_dev(cols * r, 1.0)?,
            g.rand_bf16_dev(t * r, 1.0)?,
        );
        let (mut db, mut t_acc) = (g.up(&vec![0f32; cols * r])?, g.up(&vec![0f32; t * r])?);
        let mut tt = g.poison_bf16(t * r)?;
        let ms = time_ms(g, || {
            g.k.lora_tdb(
                &g.stream,
                (&dy.as_view(), ld),
                &mut LoraAdapter {
                    b: b.as_view(),
                    low: (low.as_view(), r),
                    grad_b: db.as_view_mut(),
                },
                &mut t_acc.as_view_mut(),
                (r, 1.0),
                t,
                cols,
            )?;
            Ok(g.k.lora_t_store(
                &g.stream,
                &mut t_acc.as_view_mut(),
                (&mut tt.as_view_mut(), r),
                (t, r),
                1.0,
            )?)
        })?;
        report(
            &format!("lora_tdb + t_store 4096x{cols} r16"),
            ms,
            (t * cols * 2) as f64,
        );
    }
    let inv = g.up(&inv_freq(128, 500_000.0, None))?;
    let pos = g.up(&(0..t as u32).collect::<Vec<u32>>())?;
    let (mut cs, mut sn) = (g.poison_f32(t * 64)?, g.poison_f32(t * 64)?);
    g.k.rope_cos_sin(
        &g.stream,
        &pos.as_view(),
        &inv.as_view(),
        &mut cs.as_view_mut(),
        &mut sn.as_view_mut(),
    )?;
    let (mut q, mut k) = (
        g.rand_bf16_dev(t * 4096, 1.0)?,
        g.rand_bf16_dev(t * 1024, 1.0)?,
    );
    let ms = time_ms(g, || {
        Ok(g.k.rope_apply(
            &g.stream,
            &mut q.as_view_mut(),
            4096,
            32,
            Some((&mut k.as_view_mut(), 1024, 8)),
            &cs.as_view(),
            &sn.as_view(),
            t,
            128,
            false,
        )?)
    })?;
    report(
        "rope_apply q 32 heads + k 8 heads, d 128",
        ms,
        (2 * t * 5120 * 2) as f64,
    );
    // Cross-entropy on row chunks of 1024 rows x full vocab (the host's GEMM writes each chunk).
    let rows = 1024;
    let mut logits = g.rand_bf16_dev(rows * v, 3.0)?;
    let targets = g.up(&(0..rows as i32)
        .map(|r| r * 97 % v as i32)
        .collect::<Vec<i32>>())?;
    let mut stats = CrossEntropyRows::new(&g.stream, rows)?;
    let ms = time_ms(g, || {
        Ok(g.k.ce_stats(
            &g.stream,
            &logits.as_view(),
            v,
            rows,
            0,
            v,
            &targets.as_view(),
            &mut stats,
            true,
            true,
        )?)
    })?;
    report("ce_stats 1024x128256", ms, (rows * v * 2) as f64);
    let ms = time_ms(g, || {
        Ok(g.k.ce_grad(
            &g.stream,
            &mut logits.as_view_mut(),
            v,
            rows,
            0,
            v,
            &targets.as_view(),
            &stats.lse.as_view(),
            1e-3,
        )?)
    })?;
    report(
        "ce_grad 1024x128256 (in place)",
        ms,
        (2 * rows * v * 2) as f64,
    );
    // LoRA r16 on q,k,v,o,gate,up,down of Llama-3-8B: 41,943,040 parameters.
    let n = 41_943_040usize;
    let (mut p, gr) = (g.rand_dev(n, 0.1)?, g.rand_dev(n, 0.01)?);
    let (mut m, mut vv) = (g.up(&vec![0f32; n])?, g.up(&vec![0f32; n])?);
    let s = AdamStep::torch(1, 2e-4, 0.01, BETAS, 1e-8);
    let mut sh = g.poison_bf16(n)?;
    let ms = time_ms(g, || {
        Ok(g.k.adamw_fp32(
            &g.stream,
            &mut p.as_view_mut(),
            &gr.as_view(),
            &mut m.as_view_mut(),
            &mut vv.as_view_mut(),
            &s,
            None,
            Some(&mut sh.as_view_mut()),
        )?)
    })?;
    report(
        "adamw_fp32 41.9M params (+bf16 shadow)",
        ms,
        (n * (4 * 7 + 2)) as f64,
    );
    let maps = QuantMaps::upload(&g.stream)?;
    let blocks = n / 256;
    let (mut mc, mut vc) = (g.up(&vec![0u8; n])?, g.up(&vec![0u8; n])?);
    let (mut ma, mut va) = (g.up(&vec![0f32; blocks])?, g.up(&vec![0f32; blocks])?);
    let s8 = AdamStep::bitsandbytes(1, 2e-4, 0.01, BETAS, 1e-8);
    let ms = time_ms(g, || {
        let mut st = Adam8bitStates {
            m_codes: mc.as_view_mut(),
            m_absmax: ma.as_view_mut(),
            v_codes: vc.as_view_mut(),
            v_absmax: va.as_view_mut(),
        };
        Ok(g.k.adamw_8bit(
            &g.stream,
            &mut p.as_view_mut(),
            &gr.as_view(),
            &mut st,
            &maps,
            &s8,
            None,
            Some(&mut sh.as_view_mut()),
        )?)
    })?;
    report(
        "adamw_8bit 41.9M params (+bf16 shadow)",
        ms,
        (n * (4 * 3 + 4 + 2)) as f64,
    );
    // LoRA dropout on a q/k/v input: 4096 tokens x 4096.
    let xin = g.rand_bf16_dev(t * d, 1.0)?;
    let mut xout = g.poison_bf16(t * d)?;
    let (th, sc) = dropout::dropout_params(0.05);
    let ms = time_ms(g, || {
        Ok(g.k.dropout_apply(
            &g.stream,
            &xin.as_view(),
            &mut xout.as_view_mut(),
            th,
            sc,
            7,
            false,
        )?)
    })?;
    report("dropout_apply 4096x4096", ms, (2 * t * d * 2) as f64);
    let mut parts = g.poison_f32(REDUCE_PARTS)?;
    let (mut nd, mut cd) = (g.poison_f32(1)?, g.poison_f32(1)?);
    let ms = time_ms(g, || {
        Ok(g.k.grad_norm(
            &g.stream,
            &gr.as_view(),
            1.0,
            &mut parts.as_view_mut(),
            &mut nd.as_view_mut(),
            &mut cd.as_view_mut(),
        )?)
    })?;
    report("grad_norm 41.9M", ms, (n * 4) as f64);
    let nw = inter * d;
    let wbig = g.rand_bf16_dev(nw, 0.02)?;
    let (mut pk, mut am) = (g.up(&vec![0u8; nw / 2])?, g.poison_f32(nw / 64)?);
    let ms = time_ms(g, || {
        Ok(g.k.nf4_quantize(
            &g.stream,
            &wbig.as_view(),
            &mut pk.as_view_mut(),
            &mut am.as_view_mut(),
        )?)
    })?;
    report(
        "nf4_quantize 14336x4096",
        ms,
        (nw * 2 + nw / 2 + nw / 16) as f64,
    );
    let mut deq = g.poison_bf16(nw)?;
    let ms = time_ms(g, || {
        Ok(g.k.nf4_dequantize(
            &g.stream,
            &pk.as_view(),
            Nf4Absmax::Plain(&am.as_view()),
            &mut deq.as_view_mut(),
        )?)
    })?;
    report(
        "nf4_dequantize 14336x4096",
        ms,
        (nw * 2 + nw / 2 + nw / 16) as f64,
    );
    Ok(())
}
