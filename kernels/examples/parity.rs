//! GPU parity tool: runs every kernel on random inputs (never zeros) over several shapes,
//! including sizes that are not multiples of the block/tile sizes, and compares each output
//! with the plain-Rust reference (`ferrotune_kernels::reference`). Outputs are poisoned with
//! NaN before each launch, so an element the kernel failed to write shows up as NaN.
//!
//! Tolerances (issue "CUDA engine", ladder step 1): relative L2 error ≤ 1e-2 for bf16 outputs,
//! ≤ 1e-5 for fp32 outputs; optimizer states and quantisation codes are compared bit for bit.
//! With `--bench`, also times the memory-bound kernels at Llama-3-8B shapes (CUDA events,
//! median of 20 after warm-up) and prints the achieved bandwidth.
//!
//! With `--bench-attn`, times the fused attention forward and backward at Llama-3-8B and
//! Llama-3.2-1B shapes and prints TFLOP/s (`parity/attention.rs`).
//!
//! With `--wgmma-probe` (sm_90 only), also checks the Hopper `wgmma` building blocks the next
//! attention kernels need (`parity/wgmma.rs`, docs/perf-notes.md §10).
//!
//! Usage: `parity [--attn-only] [--skip-checks] [--bench] [--bench-attn] [--wgmma-probe]`;
//! exits 1 if any check fails. `--attn-only` runs only the attention checks, `--skip-checks`
//! none (timing only). See docs/kernels.md.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits};
use ferrotune_kernels::cache::{default_dir, KernelCache};
use ferrotune_kernels::device::{
    bf16, Adam8bitStates, CopyJob, CopyTable, CrossEntropyRows, Kernels, LoraAdapter, Nf4Absmax,
    Nf4DoubleQuant, QuantMaps, REDUCE_PARTS,
};
use ferrotune_kernels::reference::adamw::{self as radam, Adam8bitState, AdamStep};
use ferrotune_kernels::reference::{
    bf16_round, cross_entropy, dropout, nf4, norm, reduce, rope, swiglu,
};
use ferrotune_kernels::rope::{inv_freq, Llama3Scaling};
use ferrotune_kernels::{quant, IGNORE_INDEX};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[path = "parity/attention.rs"]
mod attention;
#[path = "parity/wgmma.rs"]
mod wgmma;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const BF16_TOL: f64 = 1e-2;
const F32_TOL: f64 = 1e-5;
const BETAS: (f64, f64) = (0.9, 0.999);

struct Checks {
    rows: Vec<String>,
    failed: usize,
}

/// Where `got` is off (|got − want| > tol·max(|want|, 1), or NaN on one side only), as up to
/// 8 index ranges: tells a wrong tile from noise spread over the whole tensor.
fn off_ranges(got: &[f32], want: &[f32], tol: f64) -> String {
    let off = |i: usize| {
        let (g, w) = (got[i] as f64, want[i] as f64);
        g.is_nan() != w.is_nan() || (g - w).abs() > tol * w.abs().max(1.0)
    };
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for i in (0..got.len()).filter(|&i| off(i)) {
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == i => *end = i,
            _ => ranges.push((i, i)),
        }
    }
    let shown: Vec<String> = ranges
        .iter()
        .take(8)
        .map(|(a, b)| format!("{a}..={b}"))
        .collect();
    format!("{} ranges [{}]", ranges.len(), shown.join(", "))
}

impl Checks {
    /// Records ‖got − want‖/‖want‖ and max |got − want|; NaN anywhere fails.
    fn close(&mut self, name: &str, got: &[f32], want: &[f32], tol: f64) {
        assert_eq!(got.len(), want.len(), "{name}: lengths");
        let (mut num, mut den, mut max_abs, mut nan) = (0f64, 0f64, 0f64, 0usize);
        for (&g, &w) in got.iter().zip(want) {
            if g.is_nan() != w.is_nan() {
                nan += 1;
                continue;
            }
            if g.is_nan() {
                continue;
            }
            let d = g as f64 - w as f64;
            num += d * d;
            den += (w as f64) * (w as f64);
            max_abs = max_abs.max(d.abs());
        }
        let rel = if den > 0.0 {
            (num / den).sqrt()
        } else {
            num.sqrt()
        };
        let ok = nan == 0 && rel <= tol;
        let mut detail = format!(
            "rel_l2 {rel:.3e}  max_abs {max_abs:.3e}  nan {nan}  (tol {tol:.0e}, n {})",
            got.len()
        );
        if !ok {
            detail += &format!("  off at {}", off_ranges(got, want, tol));
        }
        self.push(name, ok, detail);
    }

    /// Exact equality (bits for floats).
    fn exact<T: PartialEq + Copy>(&mut self, name: &str, got: &[T], want: &[T]) {
        let bad =
            got.iter().zip(want).filter(|(a, b)| a != b).count() + got.len().abs_diff(want.len());
        self.push(
            name,
            bad == 0,
            format!("mismatches {bad} of {}", want.len()),
        );
    }

    fn push(&mut self, name: &str, ok: bool, detail: String) {
        if !ok {
            self.failed += 1;
        }
        let line = format!("{:<4} {name:<52} {detail}", if ok { "ok" } else { "FAIL" });
        println!("{line}");
        self.rows.push(line);
    }
}

struct Gpu {
    stream: Arc<CudaStream>,
    k: Kernels,
    rng: ChaCha8Rng,
}

/// `rows` rows of `cols` values (`want`) laid `ld` apart from element `at` of a buffer of
/// `len`, everything else NaN (the poison a strided kernel must leave alone).
fn strided_want(want: &[f32], cols: usize, ld: usize, at: usize, len: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; len];
    for (r, row) in want.chunks_exact(cols).enumerate() {
        out[at + r * ld..at + r * ld + cols].copy_from_slice(row);
    }
    out
}

fn bits_eq(a: &[f32], b: &[f32]) -> (Vec<u32>, Vec<u32>) {
    (
        a.iter().map(|x| x.to_bits()).collect(),
        b.iter().map(|x| x.to_bits()).collect(),
    )
}

impl Gpu {
    /// Random values from a normal-ish distribution (sum of uniforms) times `scale`, never 0.
    fn randn(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let s: f32 = (0..4).map(|_| self.rng.random::<f32>() - 0.5).sum();
                let v = s * 1.732 * scale;
                if v == 0.0 {
                    scale * 1e-3
                } else {
                    v
                }
            })
            .collect()
    }
    fn randn_bf16(&mut self, n: usize, scale: f32) -> Vec<f32> {
        self.randn(n, scale).into_iter().map(bf16_round).collect()
    }
    fn rand_bf16_dev(&mut self, n: usize, scale: f32) -> Res<CudaSlice<bf16>> {
        let v = self.randn_bf16(n, scale);
        self.up_bf16(&v)
    }
    fn rand_dev(&mut self, n: usize, scale: f32) -> Res<CudaSlice<f32>> {
        let v = self.randn(n, scale);
        self.up(&v)
    }
    fn up_bf16(&self, x: &[f32]) -> Res<CudaSlice<bf16>> {
        let h: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        Ok(self.stream.clone_htod(&h)?)
    }
    fn up<T: DeviceRepr>(&self, x: &[T]) -> Res<CudaSlice<T>> {
        Ok(self.stream.clone_htod(x)?)
    }
    fn poison_bf16(&self, n: usize) -> Res<CudaSlice<bf16>> {
        self.up_bf16(&vec![f32::NAN; n])
    }
    fn poison_f32(&self, n: usize) -> Res<CudaSlice<f32>> {
        self.up(&vec![f32::NAN; n])
    }
    fn down_bf16(&self, x: &CudaSlice<bf16>) -> Res<Vec<f32>> {
        Ok(self
            .stream
            .clone_dtoh(x)?
            .into_iter()
            .map(|v| v.to_f32())
            .collect())
    }
    fn down<T: DeviceRepr + ValidAsZeroBits + Default + Clone>(
        &self,
        x: &CudaSlice<T>,
    ) -> Res<Vec<T>> {
        Ok(self.stream.clone_dtoh(x)?)
    }
}

fn check_rmsnorm(g: &mut Gpu, c: &mut Checks) -> Res<()> {
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

fn check_rope(g: &mut Gpu, c: &mut Checks) -> Res<()> {
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

fn check_swiglu(g: &mut Gpu, c: &mut Checks) -> Res<()> {
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
fn check_swiglu_lora(g: &mut Gpu, c: &mut Checks) -> Res<()> {
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
fn check_lora_tdb(g: &mut Gpu, c: &mut Checks) -> Res<()> {
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

fn check_cross_entropy(g: &mut Gpu, c: &mut Checks) -> Res<()> {
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

fn check_adamw(g: &mut Gpu, c: &mut Checks) -> Res<()> {
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

fn check_dropout(g: &mut Gpu, c: &mut Checks) -> Res<()> {
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

fn check_nf4(g: &mut Gpu, c: &mut Checks) -> Res<()> {
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

fn check_embedding(g: &mut Gpu, c: &mut Checks) -> Res<()> {
    let (vocab, dim, tokens) = (1000usize, 264usize, 77usize);
    let table = g.randn_bf16(vocab * dim, 1.0);
    let mut ids: Vec<u32> = (0..tokens)
        .map(|_| g.rng.random_range(0..vocab as u32))
        .collect();
    ids[5] = vocab as u32 + 7; // out of range: zero row, no out-of-bounds read
    let (td, idd) = (g.up_bf16(&table)?, g.up(&ids)?);
    let mut out = g.poison_bf16(tokens * dim)?;
    g.k.embedding_gather(
        &g.stream,
        &idd.as_view(),
        &td.as_view(),
        &mut out.as_view_mut(),
        dim,
    )?;
    let want: Vec<f32> = ids
        .iter()
        .flat_map(|&i| {
            if (i as usize) < vocab {
                table[i as usize * dim..(i as usize + 1) * dim].to_vec()
            } else {
                vec![0.0; dim]
            }
        })
        .collect();
    let (a, b) = bits_eq(&g.down_bf16(&out)?, &want);
    c.exact(&format!("embedding_gather [{tokens}x{dim}]"), &a, &b);

    // Strided row copies both ways: 16 columns out of rows 264 apart (from column 8) into a
    // dense buffer, and back into rows 24 apart (at column 8); nothing else written.
    let (cols, src_ld, at) = (16usize, dim, 8usize);
    let mut dense = g.poison_bf16(tokens * cols)?;
    g.k.copy_rows(
        &g.stream,
        (&out.slice(at..), src_ld),
        (&mut dense.as_view_mut(), cols),
        tokens,
        cols,
    )?;
    let picked: Vec<f32> = want
        .chunks_exact(dim)
        .flat_map(|row| row[at..at + cols].to_vec())
        .collect();
    let (a, b) = bits_eq(&g.down_bf16(&dense)?, &picked);
    c.exact(
        &format!("copy_rows [{tokens}x{cols}] from rows {src_ld} apart"),
        &a,
        &b,
    );
    let dst_ld = 24;
    let mut sparse = g.poison_bf16(tokens * dst_ld)?;
    g.k.copy_rows(
        &g.stream,
        (&dense.as_view(), cols),
        (&mut sparse.slice_mut(at..), dst_ld),
        tokens,
        cols,
    )?;
    let want = strided_want(&picked, cols, dst_ld, at, tokens * dst_ld);
    let (a, b) = bits_eq(&g.down_bf16(&sparse)?, &want);
    c.exact(
        &format!("copy_rows [{tokens}x{cols}] into rows {dst_ld} apart"),
        &a,
        &b,
    );

    // The same two copies as one batched launch (jobs of different sizes: the second also
    // takes one row of 8 more), into fresh poisoned buffers.
    let (dense2, sparse2) = (
        g.poison_bf16(tokens * cols)?,
        g.poison_bf16(tokens * dst_ld)?,
    );
    let ptr = |x: &CudaSlice<bf16>| x.device_ptr(&g.stream).0;
    let jobs = [
        CopyJob::new(
            (ptr(&dense2), cols),
            (ptr(&out) + 2 * at as u64, src_ld),
            cols,
            tokens,
        )?,
        CopyJob::new(
            (ptr(&sparse2) + 2 * at as u64, dst_ld),
            (ptr(&dense), cols),
            cols,
            tokens,
        )?,
        CopyJob::new((ptr(&sparse2), dst_ld), (ptr(&dense), cols), 8, 1)?,
    ];
    // SAFETY: each job stays inside its buffers (the shapes of the single copies above; the
    // third writes the 8 values before column `at` of row 0), all alive until the reads below.
    let table = unsafe { CopyTable::new(&g.stream, &jobs)? };
    g.k.copy_rows_batch(&g.stream, &table)?;
    let (a, b) = bits_eq(&g.down_bf16(&dense2)?, &picked);
    c.exact(&format!("copy_rows_batch [{tokens}x{cols}] gather"), &a, &b);
    let mut want = want;
    want[..8].copy_from_slice(&picked[..8]);
    let (a, b) = bits_eq(&g.down_bf16(&sparse2)?, &want);
    c.exact(
        &format!("copy_rows_batch [{tokens}x{cols}] scatter"),
        &a,
        &b,
    );
    Ok(())
}

/// Median time of `f` over 20 runs after 3 warm-ups, in ms (CUDA events).
fn time_ms(g: &Gpu, mut f: impl FnMut() -> Res<()>) -> Res<f32> {
    for _ in 0..3 {
        f()?;
    }
    let mut t = Vec::new();
    for _ in 0..20 {
        let a = g
            .stream
            .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        f()?;
        let b = g
            .stream
            .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        b.synchronize()?;
        t.push(a.elapsed_ms(&b)?);
    }
    t.sort_by(f32::total_cmp);
    Ok(t[t.len() / 2])
}

fn bench(g: &mut Gpu) -> Res<()> {
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

fn main() -> Res<()> {
    let flag = |f: &str| std::env::args().any(|a| a == f);
    let (bench_too, bench_attn, attn_only, skip_checks, wgmma_probe) = (
        flag("--bench"),
        flag("--bench-attn"),
        flag("--attn-only"),
        flag("--skip-checks"),
        flag("--wgmma-probe"),
    );
    let ctx = CudaContext::new(0)?;
    let stream = ctx.default_stream();
    let cache = default_dir().map(KernelCache::new);
    let t0 = std::time::Instant::now();
    let (k, report) = Kernels::load(&ctx, cache.as_ref())?;
    println!(
        "device {} ({}), {}; load {:.2} s: {} modules compiled, {} from cache {:?}",
        ctx.name()?,
        report.target,
        report.compiler,
        t0.elapsed().as_secs_f64(),
        report.compiled.len(),
        report.cached.len(),
        cache.as_ref().map(|c| c.dir().to_path_buf())
    );
    for (module, funcs) in &report.compiled {
        for f in funcs {
            println!(
                "ptxas {module}/{}: {:?} regs, {} B stack, {} B spill",
                f.name,
                f.registers,
                f.stack_frame_bytes,
                f.spill_store_bytes + f.spill_load_bytes
            );
        }
    }
    for e in &report.cache_errors {
        println!("cache write failed: {e}");
    }
    if !report.overridden.is_empty() {
        println!(
            "kernel sources replaced from the source dir: {:?}",
            report.overridden
        );
    }
    let mut g = Gpu {
        stream,
        k,
        rng: ChaCha8Rng::seed_from_u64(20_251_129),
    };
    let mut c = Checks {
        rows: Vec::new(),
        failed: 0,
    };
    if !attn_only && !skip_checks {
        check_rmsnorm(&mut g, &mut c)?;
        check_rope(&mut g, &mut c)?;
        check_swiglu(&mut g, &mut c)?;
        check_swiglu_lora(&mut g, &mut c)?;
        check_lora_tdb(&mut g, &mut c)?;
        check_cross_entropy(&mut g, &mut c)?;
        check_adamw(&mut g, &mut c)?;
        check_nf4(&mut g, &mut c)?;
        check_dropout(&mut g, &mut c)?;
        check_embedding(&mut g, &mut c)?;
    }
    // --skip-checks: timing (or profiling) only, e.g. of a kernel variant that computes wrong
    // results on purpose to measure what a stage costs.
    if !skip_checks {
        attention::check(&mut g, &mut c)?;
    }
    if wgmma_probe {
        wgmma::check(&mut g, &mut c, &ctx)?;
    }
    g.stream.synchronize()?;
    println!("\n{} checks, {} failed", c.rows.len(), c.failed);
    if bench_too {
        bench(&mut g)?;
    }
    if bench_attn {
        attention::bench(&mut g)?;
    }
    if c.failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
