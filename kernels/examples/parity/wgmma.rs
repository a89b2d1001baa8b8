//! `--wgmma-probe`: step 1 of the Hopper attention plan (docs/perf-notes.md §10). Compiles
//! `wgmma_probe.cu` for sm_90a and checks, element by element, that our descriptor encoding,
//! 128-byte swizzle, A-fragment and accumulator layouts and MN-major B give the exact product;
//! for the MN-major descriptor it tries both assignments of the two byte offsets and reports
//! which one the hardware follows. Skipped (one line) on GPUs other than compute capability 9.0.

use cudarc::driver::{CudaContext, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use ferrotune_kernels::arch::GpuArch;
use ferrotune_kernels::nvrtc;
use ferrotune_kernels::sources::KernelSource;
use rand::Rng;

use super::{Checks, Gpu, Res};

const PROBE: KernelSource = KernelSource {
    name: "wgmma_probe",
    source: include_str!("wgmma_probe.cu"),
    entries: &["wgmma_probe_ss", "wgmma_probe_rs", "wgmma_probe_tb"],
    extra_options: &[],
    accepted_stack: &[],
    accepted_spill: &[],
};

/// `[rows, cols]` of small integers (exact in bf16, and their 64-term sums exact in fp32).
fn ints(g: &mut Gpu, rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols)
        .map(|_| g.rng.random_range(-8i32..=8) as f32)
        .collect()
}

/// `a [m, k] · b`, `b` given as `[n, k]` (`b_nk`) or `[k, n]`.
fn matmul(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, b_nk: bool) -> Vec<f32> {
    let mut out = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k)
                .map(|p| a[i * k + p] * if b_nk { b[j * k + p] } else { b[p * n + j] })
                .sum();
        }
    }
    out
}

pub fn check(g: &mut Gpu, c: &mut Checks, ctx: &std::sync::Arc<CudaContext>) -> Res<()> {
    if ctx.compute_capability()? != (9, 0) {
        println!("wgmma probe skipped: needs a compute capability 9.0 GPU (sm_90a)");
        return Ok(());
    }
    let compiled = nvrtc::compile(&PROBE, GpuArch::new(9, 0))?;
    for line in compiled.log.lines().filter(|l| l.contains("C75")) {
        println!("wgmma probe ptxas: {line}");
    }
    let module = ctx.load_module(Ptx::from_binary(compiled.cubin))?;
    let a = ints(g, 64, 64);
    let b_nk = ints(g, 64, 64);
    let b_kn = ints(g, 64, 128);
    let (ad, bd_nk, bd_kn) = (g.up_bf16(&a)?, g.up_bf16(&b_nk)?, g.up_bf16(&b_kn)?);
    let one_warpgroup = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let want_nk = matmul(&a, &b_nk, 64, 64, 64, true);
    for (entry, what) in [
        ("wgmma_probe_ss", "SS, K-major A and B"),
        ("wgmma_probe_rs", "RS, A from registers"),
    ] {
        let f = module.load_function(entry)?;
        let mut out = g.poison_f32(64 * 64)?;
        let mut launch = g.stream.launch_builder(&f);
        launch.arg(&ad).arg(&bd_nk).arg(&mut out);
        // SAFETY: the buffers hold the [64, 64] inputs and output the kernel indexes.
        unsafe { launch.launch(one_warpgroup) }?;
        let got = g.down(&out)?;
        c.exact(&format!("wgmma m64n64k16 {what}"), &got, &want_nk);
    }
    let want_kn = matmul(&a, &b_kn, 64, 128, 64, false);
    let f = module.load_function("wgmma_probe_tb")?;
    for (lbo, sbo, what) in [
        (8192u32, 1024u32, "lbo 8192 sbo 1024"),
        (1024, 8192, "lbo 1024 sbo 8192"),
    ] {
        let mut out = g.poison_f32(64 * 128)?;
        let mut launch = g.stream.launch_builder(&f);
        launch
            .arg(&ad)
            .arg(&bd_kn)
            .arg(&mut out)
            .arg(&lbo)
            .arg(&sbo);
        // SAFETY: as above, [64, 128] output.
        unsafe { launch.launch(one_warpgroup) }?;
        let got = g.down(&out)?;
        let bad = got.iter().zip(&want_kn).filter(|(x, y)| x != y).count();
        // Which assignment the hardware follows is what this probe finds out: report both, fail
        // only if neither gives the product.
        println!(
            "wgmma m64n128k16 MN-major B, {what}: mismatches {bad} of {}",
            want_kn.len()
        );
        if bad == 0 {
            c.exact(
                "wgmma m64n128k16 MN-major B (one descriptor assignment)",
                &got,
                &want_kn,
            );
            return Ok(());
        }
    }
    c.exact(
        "wgmma m64n128k16 MN-major B (no descriptor assignment)",
        &[1],
        &[0],
    );
    Ok(())
}
