//! The per-instance sandbox: a Store whose WASI context grants nothing (no env, no args, no
//! preopened directories, no sockets or name lookups, stdin closed), whose stdout/stderr and
//! `log` import go to the host log under the plugin's name, whose memory is capped and whose
//! calls run under an epoch deadline.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::output::{PluginOutput, Stream};
use super::runtime::{PluginRuntime, EPOCH_TICK};
use super::storage_config::Secrets;

/// Everything a plugin instance's Store holds.
pub struct PluginState {
    pub plugin: Arc<str>,
    wasi: WasiCtx,
    table: ResourceTable,
    pub limiter: MemoryLimiter,
    pub stderr: PluginOutput,
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A fresh Store for one instance of `plugin`.
pub fn new_store(runtime: &PluginRuntime, plugin: Arc<str>) -> Store<PluginState> {
    let state = new_state_masking(runtime, plugin, Secrets::default());
    let mut store = Store::new(runtime.engine(), state);
    store.limiter(|state| &mut state.limiter);
    store.epoch_deadline_trap();
    store.set_epoch_deadline(deadline_ticks(runtime.limits().timeout));
    store
}

/// The sandbox's Store data for one instance of `plugin`, with `secrets` masked in its
/// stdout/stderr lines (for plugins whose world needs a richer Store, e.g. storage).
pub fn new_state_masking(
    runtime: &PluginRuntime,
    plugin: Arc<str>,
    secrets: Secrets,
) -> PluginState {
    let stderr = PluginOutput::new(plugin.clone(), Stream::Stderr).masking(secrets.clone());
    let wasi = WasiCtxBuilder::new()
        .stdout(PluginOutput::new(plugin.clone(), Stream::Stdout).masking(secrets))
        .stderr(stderr.clone())
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .socket_addr_check(|_, _| Box::pin(async { false }))
        .build();
    PluginState {
        limiter: MemoryLimiter::new(runtime.limits().memory_mb),
        plugin,
        wasi,
        table: ResourceTable::new(),
        stderr,
    }
}

/// Arms the per-call deadline; call before every guest call.
pub fn arm_deadline(store: &mut Store<PluginState>, timeout: Duration) {
    store.set_epoch_deadline(deadline_ticks(timeout));
}

/// Epoch ticks covering `timeout`, plus one because the current tick is already partly over.
pub fn deadline_ticks(timeout: Duration) -> u64 {
    let tick = EPOCH_TICK.as_nanos();
    (timeout.as_nanos().div_ceil(tick) as u64).saturating_add(1)
}

/// Caps the total linear memory of one instance. Growing past the cap traps with a message
/// that names the plugin and the flag, instead of the guest seeing an allocation failure.
pub struct MemoryLimiter {
    limit_bytes: usize,
    limit_mb: usize,
    used_bytes: usize,
    pub exceeded: bool,
}

impl MemoryLimiter {
    pub fn limit_mb(&self) -> usize {
        self.limit_mb
    }

    fn new(limit_mb: usize) -> Self {
        MemoryLimiter {
            limit_bytes: limit_mb.saturating_mul(1 << 20),
            limit_mb,
            used_bytes: 0,
            exceeded: false,
        }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.used_bytes - current.min(self.used_bytes) + desired;
        if total > self.limit_bytes {
            self.exceeded = true;
            wasmtime::bail!(
                "memory limit of {} MiB exceeded (--plugin_memory_mb)",
                self.limit_mb
            );
        }
        self.used_bytes = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Function tables of real plugins hold a few thousand entries.
        Ok(desired <= 1 << 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_covers_the_timeout() {
        assert_eq!(deadline_ticks(EPOCH_TICK), 2);
        assert_eq!(
            deadline_ticks(EPOCH_TICK * 10 + Duration::from_nanos(1)),
            12
        );
    }

    #[test]
    fn memory_limit_counts_all_memories() {
        let mut limiter = MemoryLimiter::new(1);
        assert!(limiter.memory_growing(0, 600 << 10, None).unwrap());
        let err = limiter.memory_growing(0, 600 << 10, None).unwrap_err();
        assert!(err.to_string().contains("1 MiB"), "{err}");
        assert!(limiter.exceeded);
    }
}
