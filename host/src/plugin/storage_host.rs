//! `--sync_to PLUGIN.wasm`: a storage backend as a plugin of the `storage` world, adapted to the
//! host's [`ObjectStore`] trait so that sync (and everything else) cannot tell it from `file://`
//! or `s3://`.
//!
//! - Bodies stream through host file resources: an upload is a `body-reader` over the local
//!   file (read in chunks of at most [`net_state::MAX_CHUNK`]), a download a `body-writer` into a
//!   temporary sibling that is fsynced and renamed into place only when `get` succeeded and
//!   the byte count matches. A 5 GB shard never sits in plugin memory.
//! - Network only through `wasi:http`, limited to `storage_config.allow_hosts` ([`NetGrant`]).
//!   No files, env or sockets otherwise (the usual sandbox).
//! - Secrets from `storage_config.secrets` reach the plugin's `configure` and nothing else: the
//!   host logs the redacted config, and masks secret values in the plugin's log lines,
//!   stdout/stderr and error messages.
//! - One instance per store, behind a mutex (sync calls come from one worker thread). A call's
//!   deadline (`--plugin_timeout_s`) is extended while it makes progress (chunks read or
//!   written), so a long transfer is fine and a stalled one traps. A trap discards the instance;
//!   the next call starts a fresh one.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use wasmtime::component::{Linker, Resource};
use wasmtime::{Store, Trap};

use super::net_grant::NetGrant;
use super::net_state::{self, BodyReader, BodyWriter, NetState};
use super::runtime::PluginRuntime;
use super::sandbox;
use super::storage_config::{NetPluginConfig, Secrets};
use super::wasm_err;
use super::world::{self, Kind, World};
use crate::storage::transfer::Partial;
use crate::storage::{key, ObjectInfo, ObjectStore, StorageError};

// Host bindings of the `storage` world, `ferrotune:plugin@0.1.0`. WASI and `wasi:http` come
// from wasmtime-wasi(-http); the imports it shares with the publish world from `net_state`.
super::net_state::net_world_bindings!("ferrotune:plugin/storage");

use v0_1_0::exports::ferrotune::plugin::storage_backend as wit;
use v0_1_0::ferrotune::plugin::types as wit_types;

/// A storage plugin instance's Store data: the network sandbox; storage adds nothing.
type StorageState = NetState<()>;

/// One live instance.
struct Instance {
    store: Store<StorageState>,
    bindings: v0_1_0::Storage,
    /// A call trapped: the instance's state is unknown, so it is never called again.
    trapped: bool,
}

/// A storage plugin behind [`ObjectStore`].
pub struct PluginStore {
    /// What the user passed (`--sync_to`), for messages.
    url: String,
    name: Arc<str>,
    runtime: PluginRuntime,
    pre: v0_1_0::StoragePre<StorageState>,
    config: NetPluginConfig,
    /// `None` after a trap: the next call instantiates afresh.
    instance: Mutex<Option<Instance>>,
}

impl PluginStore {
    /// Loads the storage plugin at `path`, checks its world, and configures one instance with
    /// `config` (its `configure` errors are settings errors naming `--sync_config`).
    pub fn open(
        runtime: &PluginRuntime,
        path: &Path,
        config: NetPluginConfig,
    ) -> Result<Self, StorageError> {
        let url = path.display().to_string();
        let wasm = std::fs::read(path).map_err(|e| {
            StorageError::Config(format!(
                "storage plugin {url}: cannot read it ({e}); pass a storage .wasm component"
            ))
        })?;
        let name: Arc<str> = path
            .file_name()
            .map_or_else(|| url.clone(), |n| n.to_string_lossy().into_owned())
            .into();
        let (pre, found) = prepare(runtime, &name, &wasm)
            .map_err(|e| StorageError::Config(format!("--sync_to {url}: {e:#}")))?;
        tracing::info!(
            plugin = %name,
            world = %found,
            allow_hosts = ?config.allow_hosts,
            config = config.redacted_json(),
            "storage plugin loading"
        );
        let store = PluginStore {
            url,
            name,
            runtime: runtime.clone(),
            pre,
            config,
            instance: Mutex::new(None),
        };
        let mut slot = store.instance.lock().unwrap();
        let instance = store.instantiate()?;
        *slot = Some(instance);
        drop(slot);
        Ok(store)
    }

    fn timeout(&self) -> Duration {
        self.runtime.limits().timeout
    }

    /// A fresh, configured instance.
    fn instantiate(&self) -> Result<Instance, StorageError> {
        let timeout = self.timeout();
        // A call may run as long as it keeps moving bytes; one that stalls for the whole
        // deadline traps.
        let state = StorageState::new(
            &self.runtime,
            self.name.clone(),
            NetGrant::new(self.name.clone(), self.config.allow_hosts.clone(), timeout),
            self.config.secrets().clone(),
            (),
        );
        let mut store = state.into_store(self.runtime.engine(), timeout);
        let bindings = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| self.trap(&mut store, e))?;
        let mut instance = Instance {
            store,
            bindings,
            trapped: false,
        };
        let info = self.call(&mut instance, |b, s| {
            b.ferrotune_plugin_storage_backend().call_describe(s)
        })?;
        let configured = self.call(&mut instance, |b, s| {
            b.ferrotune_plugin_storage_backend()
                .call_configure(s, self.config.plugin_json())
        })?;
        configured.map_err(|e| match self.plugin_error(&mut instance, e) {
            StorageError::Config(m) => {
                StorageError::Config(format!("--sync_config storage_config: {m}"))
            }
            other => other,
        })?;
        tracing::info!(
            plugin = %self.name,
            name = info.name,
            version = info.version,
            "storage plugin ready"
        );
        Ok(instance)
    }

    /// Runs one guest call with a fresh deadline; a trap becomes an error.
    fn call<R>(
        &self,
        instance: &mut Instance,
        f: impl FnOnce(&v0_1_0::Storage, &mut Store<StorageState>) -> wasmtime::Result<R>,
    ) -> Result<R, StorageError> {
        instance.store.data_mut().restart_idle_clock();
        instance
            .store
            .set_epoch_deadline(sandbox::deadline_ticks(self.timeout()));
        f(&instance.bindings, &mut instance.store).map_err(|e| {
            instance.trapped = true;
            self.trap(&mut instance.store, e)
        })
    }

    /// Describes a trap in one line (deadline, memory, panic + the plugin's last stderr).
    fn trap(&self, store: &mut Store<StorageState>, err: wasmtime::Error) -> StorageError {
        let state = store.data();
        let timeout = self.timeout().as_secs_f64();
        let stderr = state.stderr_tail();
        let message = |why: String| {
            state
                .secrets
                .mask(&format!("storage plugin {} {why}{stderr}", self.name))
        };
        if state.sandbox.limiter.exceeded {
            StorageError::Config(message(format!(
                "exceeded its memory limit of {} MiB (--plugin_memory_mb)",
                state.sandbox.limiter.limit_mb()
            )))
        } else if err.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            // A stalled transfer: the network may come back.
            StorageError::Transient(message(format!(
                "made no progress for {timeout}s (--plugin_timeout_s)"
            )))
        } else if let Some(trap) = err.downcast_ref::<Trap>() {
            StorageError::Config(message(format!("trapped ({trap})")))
        } else {
            StorageError::Config(message(format!("failed ({})", err.root_cause())))
        }
    }

    /// A `plugin-error` as a [`StorageError`], secrets masked; a refused request is reported
    /// in the host's words.
    fn plugin_error(&self, instance: &mut Instance, e: wit_types::PluginError) -> StorageError {
        let state = instance.store.data();
        let denied = state.grant.take_denied();
        if let Some(authority) = denied.first() {
            let allowed = state.grant.allowed();
            return StorageError::Config(format!(
                "storage plugin {} tried to reach {authority}, which is not in \
                 --sync_config storage_config.allow_hosts ({}); the host refused it. Add \
                 \"{authority}\" to allow_hosts if the plugin should reach it",
                self.name,
                if allowed.is_empty() {
                    "empty: no network".to_string()
                } else {
                    allowed.join(", ")
                }
            ));
        }
        let mask = |m: String| state.secrets.mask(&format!("{}: {m}", self.url));
        match e {
            wit_types::PluginError::InvalidConfig(m) => StorageError::Config(mask(m)),
            wit_types::PluginError::NotFound(m) => StorageError::NotFound(mask(m)),
            wit_types::PluginError::Denied(m) => StorageError::Config(mask(m)),
            wit_types::PluginError::Other(m) => StorageError::Transient(mask(m)),
        }
    }

    /// Runs `op` on the live instance (instantiating one if a trap discarded the last), then
    /// clears refusals the call did not report.
    fn with_instance<R>(
        &self,
        op: impl FnOnce(&Self, &mut Instance) -> Result<R, StorageError>,
    ) -> Result<R, StorageError> {
        let mut slot = self.instance.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(self.instantiate()?);
        }
        let instance = slot.as_mut().expect("instantiated above");
        let result = op(self, instance);
        if instance.trapped {
            *slot = None;
        } else {
            instance.store.data().grant.take_denied();
        }
        result
    }

    fn checked(&self, info: wit::ObjectInfo, key: &str) -> Result<ObjectInfo, StorageError> {
        if info.key != key {
            return Err(StorageError::Integrity(format!(
                "{}/{key}: the plugin reported key {:?}",
                self.url, info.key
            )));
        }
        Ok(from_wit(info))
    }
}

fn from_wit(info: wit::ObjectInfo) -> ObjectInfo {
    ObjectInfo {
        key: info.key,
        size: info.size,
        etag: info.etag,
        modified_ms: info.modified_ms,
    }
}

/// Compiles (or loads from the cache) a storage component, checks its world and pre-links it.
fn prepare(
    runtime: &PluginRuntime,
    name: &str,
    wasm: &[u8],
) -> anyhow::Result<(v0_1_0::StoragePre<StorageState>, World)> {
    let component = runtime.component(name, wasm)?;
    let found = world::detect(runtime.engine(), &component, name)?;
    if found.kind != Kind::Storage {
        anyhow::bail!("this is a {} plugin, not a storage backend", found.kind);
    }
    let linker = storage_linker(runtime)?;
    let pre = linker
        .instantiate_pre(&component)
        .map_err(wasm_err)
        .and_then(|pre| v0_1_0::StoragePre::new(pre).map_err(wasm_err))
        .with_context(|| {
            format!(
                "storage plugin {name} needs an import ferrotune does not give storage plugins \
                 (WASI without files or sockets, wasi:http, ferrotune:plugin/log and host-files)"
            )
        })?;
    Ok((pre, found))
}

/// What a storage component says about itself (`ferrotune plugin inspect`), without
/// configuring it or granting it any network.
pub fn describe_component(
    runtime: &PluginRuntime,
    name: &str,
    wasm: &[u8],
) -> anyhow::Result<super::formatter::PluginInfo> {
    let (pre, _) = prepare(runtime, name, wasm)?;
    let name: Arc<str> = name.into();
    let timeout = runtime.limits().timeout;
    let grant = NetGrant::new(name.clone(), Vec::new(), timeout);
    let state = StorageState::new(runtime, name, grant, Secrets::default(), ());
    let mut store = state.into_store(runtime.engine(), timeout);
    let bindings = pre.instantiate(&mut store).map_err(wasm_err)?;
    let info = bindings
        .ferrotune_plugin_storage_backend()
        .call_describe(&mut store)
        .map_err(wasm_err)?;
    Ok(super::formatter::PluginInfo {
        name: info.name,
        version: info.version,
        description: info.description,
        config_schema: info.config_schema,
    })
}

/// WASI (no files, sockets or env: the sandbox's context), `wasi:http` through [`NetGrant`],
/// and the world's imports (all shared with the publish world).
fn storage_linker(runtime: &PluginRuntime) -> anyhow::Result<Linker<StorageState>> {
    let mut linker = Linker::new(runtime.engine());
    net_state::add_shared_imports(&mut linker)?;
    Ok(linker)
}

impl ObjectStore for PluginStore {
    fn url(&self) -> &str {
        &self.url
    }

    fn put_file(&self, key: &str, src: &Path) -> Result<ObjectInfo, StorageError> {
        key::check(key)?;
        let file = File::open(src).map_err(|e| StorageError::local("cannot read", src, e))?;
        let size = file
            .metadata()
            .map_err(|e| StorageError::local("cannot read", src, e))?
            .len();
        self.with_instance(|this, instance| {
            let reader = instance
                .store
                .data_mut()
                .table()
                .push(BodyReader::new(file, size))
                .map_err(|e| StorageError::Config(format!("host resource table: {e}")))?;
            let handle = Resource::<BodyReader>::new_borrow(reader.rep());
            let result = this.call(instance, |b, s| {
                b.ferrotune_plugin_storage_backend()
                    .call_put(s, key, handle)
            });
            let read = instance
                .store
                .data_mut()
                .table()
                .delete(reader)
                .map_or(0, |r| r.bytes_read());
            let info = match result? {
                Ok(info) => this.checked(info, key)?,
                Err(e) => return Err(this.plugin_error(instance, e)),
            };
            if read != size || info.size != size {
                return Err(StorageError::Integrity(format!(
                    "{}/{key}: uploaded {} of {size} bytes, the store holds {} ({})",
                    this.url,
                    read,
                    info.size,
                    src.display()
                )));
            }
            Ok(info)
        })
    }

    fn get_file(&self, key: &str, dest: &Path) -> Result<ObjectInfo, StorageError> {
        key::check(key)?;
        let partial = Partial::new(dest)?;
        self.with_instance(|this, instance| {
            let writer = instance
                .store
                .data_mut()
                .table()
                .push(BodyWriter::new(partial))
                .map_err(|e| StorageError::Config(format!("host resource table: {e}")))?;
            let handle = Resource::<BodyWriter>::new_borrow(writer.rep());
            let result = this.call(instance, |b, s| {
                b.ferrotune_plugin_storage_backend()
                    .call_get(s, key, handle)
            });
            let body = instance.store.data_mut().table().delete(writer).ok();
            let info = match result? {
                Ok(info) => this.checked(info, key)?,
                Err(e) => return Err(this.plugin_error(instance, e)),
            };
            let body = body.ok_or_else(|| {
                StorageError::Integrity(format!("{}/{key}: download target vanished", this.url))
            })?;
            if body.written() != info.size {
                return Err(StorageError::Integrity(format!(
                    "{}/{key}: got {} of {} bytes",
                    this.url,
                    body.written(),
                    info.size
                )));
            }
            body.commit()?;
            Ok(info)
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        key::check_prefix(prefix)?;
        let mut objects = self.with_instance(|this, instance| {
            match this.call(instance, |b, s| {
                b.ferrotune_plugin_storage_backend().call_list(s, prefix)
            })? {
                Ok(objects) => Ok(objects),
                Err(e) => Err(this.plugin_error(instance, e)),
            }
        })?;
        // A plugin may list more than asked (whole directories); keys must still be valid.
        objects.retain(|o| o.key.starts_with(prefix));
        let mut out = Vec::with_capacity(objects.len());
        for object in objects {
            key::check(&object.key).map_err(|e| {
                StorageError::Integrity(format!("{}: the plugin listed a bad key: {e}", self.url))
            })?;
            out.push(from_wit(object));
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out.dedup_by(|a, b| a.key == b.key);
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), StorageError> {
        key::check(key)?;
        self.with_instance(|this, instance| {
            match this.call(instance, |b, s| {
                b.ferrotune_plugin_storage_backend().call_delete(s, key)
            })? {
                Ok(()) => Ok(()),
                Err(wit_types::PluginError::NotFound(_)) => Ok(()),
                Err(e) => Err(this.plugin_error(instance, e)),
            }
        })
    }

    fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        key::check(key)?;
        self.with_instance(|this, instance| {
            match this.call(instance, |b, s| {
                b.ferrotune_plugin_storage_backend().call_head(s, key)
            })? {
                Ok(Some(info)) => this.checked(info, key).map(Some),
                Ok(None) | Err(wit_types::PluginError::NotFound(_)) => Ok(None),
                Err(e) => Err(this.plugin_error(instance, e)),
            }
        })
    }
}
