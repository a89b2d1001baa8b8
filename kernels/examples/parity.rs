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

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use ferrotune_kernels::cache::{default_dir, KernelCache};
use ferrotune_kernels::device::{bf16, Kernels};
use ferrotune_kernels::reference::bf16_round;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[path = "parity/attention.rs"]
mod attention;
#[path = "parity/bench.rs"]
mod bench;
#[path = "parity/gather.rs"]
mod gather;
#[path = "parity/loss.rs"]
mod loss;
#[path = "parity/mlp.rs"]
mod mlp;
#[path = "parity/nf4_dropout.rs"]
mod nf4_dropout;
#[path = "parity/norm_rope.rs"]
mod norm_rope;
#[path = "parity/optim.rs"]
mod optim;
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
        norm_rope::check_rmsnorm(&mut g, &mut c)?;
        norm_rope::check_rope(&mut g, &mut c)?;
        mlp::check_swiglu(&mut g, &mut c)?;
        mlp::check_swiglu_lora(&mut g, &mut c)?;
        mlp::check_lora_tdb(&mut g, &mut c)?;
        loss::check_cross_entropy(&mut g, &mut c)?;
        optim::check_adamw(&mut g, &mut c)?;
        nf4_dropout::check_nf4(&mut g, &mut c)?;
        nf4_dropout::check_dropout(&mut g, &mut c)?;
        gather::check_embedding(&mut g, &mut c)?;
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
        bench::bench(&mut g)?;
    }
    if bench_attn {
        attention::bench(&mut g)?;
    }
    if c.failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
