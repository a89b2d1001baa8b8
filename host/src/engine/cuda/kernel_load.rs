//! The kernels compiled (or read from the disk cache) on their own thread while the weights
//! upload.
//!
//! The first process on a fresh machine spends seconds in its first NVRTC compilation (≈ 3 s
//! on the H200 machine against 0.3 s later, docs/perf-notes.md §24–25), and the weights' upload
//! needs no kernel until the first NF4 quantisation. So the load starts the kernels first and
//! waits for them only where a kernel runs.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use cudarc::driver::CudaContext;
use ferrotune_kernels::cache::KernelCache;
use ferrotune_kernels::device::{Kernels, LoadReport};
use ferrotune_kernels::KernelError;

/// What the thread returns: the kernels and the seconds it took.
type Loaded = (Result<(Kernels, LoadReport), KernelError>, f64);

/// The loading thread and what the log line needs once it is joined.
struct Pending {
    job: JoinHandle<Loaded>,
    device_name: String,
}

/// Kernels on their way (a thread running [`Kernels::load`]) or ready.
pub struct KernelLoad {
    pending: Option<Pending>,
    kernels: Option<Kernels>,
}

impl KernelLoad {
    /// Starts loading every module for the device of `ctx` on a new thread.
    pub fn start(ctx: &Arc<CudaContext>, cache: Option<KernelCache>, device_name: &str) -> Self {
        let thread_ctx = ctx.clone();
        let job = std::thread::spawn(move || {
            let started = Instant::now();
            let loaded = Kernels::load(&thread_ctx, cache.as_ref());
            (loaded, started.elapsed().as_secs_f64())
        });
        KernelLoad {
            pending: Some(Pending {
                job,
                device_name: device_name.to_string(),
            }),
            kernels: None,
        }
    }

    /// The kernels, waiting for the loading thread the first time.
    pub fn ready(&mut self) -> Result<&Kernels> {
        if let Some(p) = self.pending.take() {
            let waiting_since = Instant::now();
            let (loaded, load_s) = p
                .job
                .join()
                .map_err(|_| anyhow!("the thread loading the CUDA kernels panicked"))?;
            let (kernels, report) = loaded.context("loading the CUDA kernels")?;
            let waited_s = waiting_since.elapsed().as_secs_f64();
            log_ready(&report, &p.device_name, load_s, waited_s);
            self.kernels = Some(kernels);
        }
        self.kernels
            .as_ref()
            .ok_or_else(|| anyhow!("the CUDA kernels failed to load earlier"))
    }

    /// The kernels, owned (waiting for them if still loading).
    pub fn into_ready(mut self) -> Result<Kernels> {
        self.ready()?;
        Ok(self.kernels.expect("ready() returned Ok"))
    }
}

/// One line on what the load did and how long the upload waited for it (0 when the
/// compilation hid entirely behind the upload).
fn log_ready(report: &LoadReport, device_name: &str, load_s: f64, waited_s: f64) {
    tracing::info!(
        target = %report.target,
        compiled = report.compiled.len(),
        cached = report.cached.len(),
        load_s = format!("{load_s:.2}"),
        cubins_s = format!("{:.2}", report.cubins_s),
        modules_s = format!("{:.2}", report.modules_s),
        waited_s = format!("{waited_s:.2}"),
        "cuda kernels ready on {device_name}"
    );
    for error in &report.cache_errors {
        tracing::warn!("kernel cache not written ({error}); the next start compiles again");
    }
    if !report.overridden.is_empty() {
        tracing::warn!(
            "kernel sources replaced from ${}: {} (kernel development only)",
            ferrotune_kernels::sources::SOURCE_DIR_ENV,
            report.overridden.join(", ")
        );
    }
}
