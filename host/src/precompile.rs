//! `ferrotune kernels`: the CUDA kernels compiled ahead of time into the kernel cache.
//!
//! The engine compiles its kernels with NVRTC at launch and caches the cubins; on a fresh
//! machine the first compilation costs seconds (docs/perf-notes.md §24–25). NVRTC needs no GPU,
//! so a container image can carry a filled cache: run this while building it, with the
//! `FERROTUNE_CACHE_DIR` the workers will use.

use anyhow::Result;

use crate::cli::args::KernelsArgs;

#[cfg(not(feature = "cuda"))]
pub fn run(_args: &KernelsArgs) -> Result<()> {
    anyhow::bail!(
        "ferrotune kernels: this ferrotune was built without the cuda engine; rebuild it with \
         `--features cuda`"
    )
}

#[cfg(feature = "cuda")]
pub fn run(args: &KernelsArgs) -> Result<()> {
    use anyhow::{bail, Context};
    use ferrotune_kernels::{arch, cache, device, nvrtc};

    let dir = cache::default_dir().context(
        "ferrotune kernels: no cache directory; set FERROTUNE_CACHE_DIR to where the workers \
         will look (or HOME)",
    )?;
    if !nvrtc::available() {
        bail!(
            "ferrotune kernels: libnvrtc not found; install CUDA's NVRTC (e.g. `pip install \
             nvidia-cuda-nvrtc==13.0.88`) and put its lib directory on LD_LIBRARY_PATH"
        );
    }
    let targets = if args.arch.is_empty() {
        arch::CI_TARGETS.to_vec()
    } else {
        args.arch.clone()
    };
    let cache = cache::KernelCache::new(&dir);
    for target in targets {
        let report = device::precompile(target, &cache)
            .with_context(|| format!("ferrotune kernels: compiling for {target}"))?;
        if let Some(error) = report.cache_errors.first() {
            bail!("ferrotune kernels: cannot write the kernel cache: {error}");
        }
        println!(
            "{}: {} modules compiled, {} already cached ({:.1} s, {}) in {}",
            report.target,
            report.compiled.len(),
            report.cached.len(),
            report.cubins_s,
            report.compiler,
            dir.display()
        );
    }
    Ok(())
}
