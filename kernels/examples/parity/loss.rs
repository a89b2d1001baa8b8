//! Parity checks of the chunked cross-entropy kernels.

use ferrotune_kernels::device::CrossEntropyRows;
use ferrotune_kernels::reference::cross_entropy;
use ferrotune_kernels::IGNORE_INDEX;
use rand::Rng;

use super::{Checks, Gpu, Res, BF16_TOL, F32_TOL};

pub fn check_cross_entropy(g: &mut Gpu, c: &mut Checks) -> Res<()> {
    // (rows, vocab, chunk widths): an odd vocabulary cut into uneven chunks (rows start
    // unaligned), and Llama-3's vocabulary in one chunk.
    for (rows, vocab, chunks) in [
        (67usize, 32003usize, vec![10000usize, 13001, 9002]),
        (64, 128256, vec![128256]),
    ] {
        let logits = g.randn_bf16(rows * vocab, 3.0);
        let targets: Vec<i32> = (0..rows)
            .map(|r| {
                if r % 5 == 3 {
                    IGNORE_INDEX
                } else {
                    g.rng.random_range(0..vocab as i32)
                }
            })
            .collect();
        let valid = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
        let scale = 1.0 / valid as f32;
        let want = cross_entropy::cross_entropy(&logits, vocab, &targets, scale);
        let mut ld = g.up_bf16(&logits)?;
        let td = g.up(&targets)?;
        let mut stats = CrossEntropyRows::new(&g.stream, rows)?;
        g.stream
            .memcpy_htod(&vec![f32::NAN; rows], &mut stats.lse)?;
        g.stream
            .memcpy_htod(&vec![f32::NAN; rows], &mut stats.loss)?;
        let mut v0 = 0;
        for (i, &w) in chunks.iter().enumerate() {
            let view = ld.slice(v0..);
            g.k.ce_stats(
                &g.stream,
                &view,
                vocab,
                rows,
                v0,
                w,
                &td.as_view(),
                &mut stats,
                i == 0,
                i + 1 == chunks.len(),
            )?;
            v0 += w;
        }
        let mut v0 = 0;
        for &w in &chunks {
            let mut view = ld.slice_mut(v0..);
            g.k.ce_grad(
                &g.stream,
                &mut view,
                vocab,
                rows,
                v0,
                w,
                &td.as_view(),
                &stats.lse.as_view(),
                scale,
            )?;
            v0 += w;
        }
        let tag = format!("[{rows}x{vocab}] {} chunks", chunks.len());
        let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        c.close(
            &format!("ce_stats lse {tag}"),
            &g.down(&stats.lse)?,
            &f(&want.lse),
            F32_TOL,
        );
        c.close(
            &format!("ce_stats loss {tag}"),
            &g.down(&stats.loss)?,
            &f(&want.loss),
            F32_TOL,
        );
        c.close(
            &format!("ce_grad dlogits {tag}"),
            &g.down_bf16(&ld)?,
            &want.dlogits,
            BF16_TOL,
        );
    }
    Ok(())
}
