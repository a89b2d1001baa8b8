//! One wasmtime Engine per process (epoch interruption on), the compiled-component cache, and
//! the Linker that gives formatter plugins their imports.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine};

use super::bindings::v0_1_0;
use super::cache::{self, CacheOutcome};
use super::sandbox::PluginState;
use super::wasm_err;

/// How often the epoch advances; per-call deadlines are rounded up to it.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Resource limits of every plugin instance (`--plugin_memory_mb`, `--plugin_timeout_s`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PluginLimits {
    pub memory_mb: usize,
    /// Deadline of one call into a plugin (one batch for formatters).
    pub timeout: Duration,
}

impl PluginLimits {
    /// The job's `--plugin_memory_mb` and `--plugin_timeout_s`.
    pub fn from_job(job: &crate::job::JobConfig) -> Self {
        PluginLimits {
            memory_mb: job.plugins.plugin_memory_mb,
            timeout: Duration::from_secs_f64(job.plugins.plugin_timeout_s),
        }
    }
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits {
            memory_mb: 512,
            timeout: Duration::from_secs(30),
        }
    }
}

/// The Engine, the cache and the formatter Linker. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct PluginRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    limits: PluginLimits,
    cache_dir: Option<PathBuf>,
    formatter_linker: Linker<PluginState>,
    cache_hits: AtomicUsize,
    compiles: AtomicUsize,
}

impl PluginRuntime {
    /// A runtime caching compiled plugins in the default cache directory
    /// (`FERROTUNE_CACHE_DIR`, `$XDG_CACHE_HOME/ferrotune` or `~/.cache/ferrotune`, then `plugins/`).
    pub fn new(limits: PluginLimits) -> Result<Self> {
        Self::with_cache_dir(limits, cache::default_dir())
    }

    /// A runtime caching compiled plugins in `cache_dir` (`None`: compile every time).
    pub fn with_cache_dir(limits: PluginLimits, cache_dir: Option<PathBuf>) -> Result<Self> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        let engine = Engine::new(&config)
            .map_err(wasm_err)
            .context("create the wasm engine")?;
        spawn_epoch_ticker(&engine);

        let mut formatter_linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut formatter_linker).map_err(wasm_err)?;
        v0_1_0::Formatter::add_to_linker::<_, HasSelf<_>>(&mut formatter_linker, |s| s)
            .map_err(wasm_err)?;

        Ok(PluginRuntime {
            inner: Arc::new(Inner {
                engine,
                limits,
                cache_dir,
                formatter_linker,
                cache_hits: AtomicUsize::new(0),
                compiles: AtomicUsize::new(0),
            }),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    pub fn limits(&self) -> PluginLimits {
        self.inner.limits
    }

    pub(super) fn formatter_linker(&self) -> &Linker<PluginState> {
        &self.inner.formatter_linker
    }

    /// Compiles `wasm` or loads it from the cache.
    pub(super) fn component(&self, plugin: &str, wasm: &[u8]) -> Result<Component> {
        let (component, outcome) =
            cache::load(&self.inner.engine, self.inner.cache_dir.as_deref(), wasm)
                .with_context(|| format!("plugin {plugin}: not a valid wasm component"))?;
        let counter = match outcome {
            CacheOutcome::Hit => &self.inner.cache_hits,
            CacheOutcome::Compiled => &self.inner.compiles,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(plugin, ?outcome, "plugin component ready");
        Ok(component)
    }

    /// (components loaded from the cache, components compiled) by this runtime so far.
    pub fn cache_stats(&self) -> (usize, usize) {
        (
            self.inner.cache_hits.load(Ordering::Relaxed),
            self.inner.compiles.load(Ordering::Relaxed),
        )
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until the engine is dropped.
fn spawn_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("plugin-epoch".into())
        .spawn(move || loop {
            std::thread::sleep(EPOCH_TICK);
            match weak.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => return,
            }
        })
        .expect("spawn the plugin deadline thread");
}
