//! What the plugin worlds that reach the network (`storage`, `publish`) share on the host side:
//! the Store data ([`NetState`]: the sandbox, `wasi:http` through a [`NetGrant`], the secrets
//! to mask, a byte counter that keeps a long transfer alive), and one implementation of the
//! imports both worlds have — `types`, `log` (secrets masked) and `host-files` (bodies streamed
//! through local files in chunks of at most [`MAX_CHUNK`]). Each world adds its own part `W`
//! (publish: the artefacts the plugin may open) and its own exports.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{Resource, ResourceTable};
use wasmtime::{Engine, Store, Trap, UpdateDeadline};
use wasmtime_wasi::{WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::net_grant::NetGrant;
use super::runtime::PluginRuntime;
use super::sandbox::{self, PluginState};
use super::storage_config::Secrets;
use crate::storage::transfer::Partial;

/// Host bindings of a network world (`storage`, `publish`) as a module `v0_1_0`: WASI and
/// `wasi:http` from wasmtime-wasi(-http), the shared imports from [`bindings`], so the two
/// worlds differ only in their name and their own interfaces.
macro_rules! net_world_bindings {
    ($world:literal) => {
        mod v0_1_0 {
            wasmtime::component::bindgen!({
                path: "../wit",
                world: $world,
                require_store_data_send: true,
                with: {
                    "wasi:http": wasmtime_wasi_http::p2::bindings::http,
                    "wasi:io": wasmtime_wasi::p2::bindings::io,
                    "wasi:clocks": wasmtime_wasi::p2::bindings::clocks,
                    "ferrotune:plugin/types": crate::plugin::bindings::v0_1_0::ferrotune::plugin::types,
                    "ferrotune:plugin/log": crate::plugin::bindings::v0_1_0::ferrotune::plugin::log,
                    "ferrotune:plugin/host-files": crate::plugin::net_state::bindings::ferrotune::plugin::host_files,
                },
            });
        }
    };
}
pub(super) use net_world_bindings;

/// Largest chunk one `body-reader.read` returns.
pub const MAX_CHUNK: u32 = 4 << 20;

/// Host bindings of the imports the network worlds share, generated once: the worlds' own
/// bindings map `host-files` here and `types`/`log` to the formatter world's (`with`), so one
/// implementation serves both.
pub(super) mod bindings {
    wasmtime::component::bindgen!({
        inline: "
            package ferrotune:net-host;
            world shared-imports {
                import ferrotune:plugin/log@0.1.0;
                import ferrotune:plugin/host-files@0.1.0;
            }
        ",
        path: "../wit",
        require_store_data_send: true,
        with: {
            "ferrotune:plugin/types": crate::plugin::bindings::v0_1_0::ferrotune::plugin::types,
            "ferrotune:plugin/log": crate::plugin::bindings::v0_1_0::ferrotune::plugin::log,
            "ferrotune:plugin/host-files.body-reader": super::BodyReader,
            "ferrotune:plugin/host-files.body-writer": super::BodyWriter,
        },
    });
}

use super::bindings::v0_1_0::ferrotune::plugin::{log as wit_log, types as wit_types};
use bindings::ferrotune::plugin::host_files;

/// An upload body or an artefact file: the local file, read front to back.
pub struct BodyReader {
    file: File,
    size: u64,
    read: u64,
}

impl BodyReader {
    pub fn new(file: File, size: u64) -> Self {
        BodyReader {
            file,
            size,
            read: 0,
        }
    }

    /// Bytes handed to the plugin so far.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }
}

/// A download target: a temporary sibling of the destination (only the storage world hands
/// one out).
pub struct BodyWriter {
    partial: Partial,
    written: u64,
}

impl BodyWriter {
    pub fn new(partial: Partial) -> Self {
        BodyWriter {
            partial,
            written: 0,
        }
    }

    /// Bytes the plugin wrote.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Moves the download into place.
    pub fn commit(self) -> Result<(), crate::storage::StorageError> {
        self.partial.commit()
    }
}

/// The Store data of a network plugin instance; `world` is what its world adds.
pub struct NetState<W> {
    pub sandbox: PluginState,
    http: WasiHttpCtx,
    pub grant: NetGrant,
    pub secrets: Secrets,
    /// Bytes moved through host files; the deadline callback extends a call while it grows.
    progress: u64,
    progress_seen: u64,
    pub world: W,
}

impl<W: Send> WasiView for NetState<W> {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        self.sandbox.ctx()
    }
}

impl<W: Send> WasiHttpView for NetState<W> {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        let WasiCtxView { table, .. } = self.sandbox.ctx();
        WasiHttpCtxView {
            hooks: &mut self.grant,
            table,
            ctx: &mut self.http,
        }
    }
}

impl<W: Send + 'static> NetState<W> {
    /// The sandbox of `plugin` (secrets masked in its stdout/stderr) with `grant` as its network.
    pub fn new(
        runtime: &PluginRuntime,
        plugin: Arc<str>,
        grant: NetGrant,
        secrets: Secrets,
        world: W,
    ) -> Self {
        NetState {
            sandbox: sandbox::new_state_masking(runtime, plugin, secrets.clone()),
            http: WasiHttpCtx::new(),
            grant,
            secrets,
            progress: 0,
            progress_seen: 0,
            world,
        }
    }

    /// A Store over this state, memory-capped, whose calls trap after `idle` without a byte
    /// moving through host files (a long transfer is fine, a stalled one is not).
    pub fn into_store(self, engine: &Engine, idle: Duration) -> Store<Self> {
        let mut store = Store::new(engine, self);
        store.limiter(|state| &mut state.sandbox.limiter);
        let ticks = sandbox::deadline_ticks(idle);
        store.epoch_deadline_callback(move |mut ctx| {
            let state = ctx.data_mut();
            if state.progress != state.progress_seen {
                state.progress_seen = state.progress;
                Ok(UpdateDeadline::Continue(ticks))
            } else {
                Err(wasmtime::Error::from(Trap::Interrupt))
            }
        });
        store.set_epoch_deadline(ticks);
        store
    }
}

impl<W: Send> NetState<W> {
    pub fn table(&mut self) -> &mut ResourceTable {
        self.sandbox.ctx().table
    }

    /// Starts a call's no-progress window afresh (the caller re-arms the epoch deadline).
    pub fn restart_idle_clock(&mut self) {
        self.progress_seen = self.progress;
    }

    /// `; its stderr ended with: …` from the plugin's last stderr lines (empty if none), for
    /// trap messages.
    pub fn stderr_tail(&self) -> String {
        let tail = self.sandbox.stderr.take_tail();
        if tail.is_empty() {
            String::new()
        } else {
            format!("; its stderr ended with: {}", tail.join(" | "))
        }
    }
}

impl<W: Send> wit_types::Host for NetState<W> {}

/// `log` lines go to the host log under the plugin's name, secrets masked.
impl<W: Send> wit_log::Host for NetState<W> {
    fn log(&mut self, level: wit_types::LogLevel, message: String) {
        super::bindings::emit(&self.sandbox.plugin, level, &self.secrets.mask(&message));
    }
}

fn local_error(what: &str, e: std::io::Error) -> wit_types::PluginError {
    wit_types::PluginError::Other(format!("host: {what}: {e}"))
}

impl<W: Send> host_files::Host for NetState<W> {}

impl<W: Send> host_files::HostBodyReader for NetState<W> {
    fn size(&mut self, reader: Resource<BodyReader>) -> u64 {
        self.table().get(&reader).map_or(0, |r| r.size)
    }

    fn read(
        &mut self,
        reader: Resource<BodyReader>,
        max: u32,
    ) -> Result<Vec<u8>, wit_types::PluginError> {
        let reader = self
            .table()
            .get_mut(&reader)
            .map_err(|e| local_error("body-reader", std::io::Error::other(e)))?;
        let want = max.min(MAX_CHUNK) as u64;
        let want = want.min(reader.size.saturating_sub(reader.read)) as usize;
        let mut chunk = vec![0u8; want];
        let mut filled = 0;
        while filled < want {
            match reader.file.read(&mut chunk[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(local_error("reading a file", e)),
            }
        }
        chunk.truncate(filled);
        reader.read += filled as u64;
        self.progress += filled as u64;
        Ok(chunk)
    }

    fn drop(&mut self, reader: Resource<BodyReader>) -> wasmtime::Result<()> {
        // The host owns these resources and deletes them after the call; a guest drop of a
        // borrowed handle never reaches here, but an owned one would.
        let _ = self.table().delete(reader);
        Ok(())
    }
}

impl<W: Send> host_files::HostBodyWriter for NetState<W> {
    fn write(
        &mut self,
        writer: Resource<BodyWriter>,
        bytes: Vec<u8>,
    ) -> Result<(), wit_types::PluginError> {
        let writer = self
            .table()
            .get_mut(&writer)
            .map_err(|e| local_error("body-writer", std::io::Error::other(e)))?;
        writer
            .partial
            .file()
            .write_all(&bytes)
            .map_err(|e| local_error("writing the download", e))?;
        writer.written += bytes.len() as u64;
        self.progress += bytes.len() as u64;
        Ok(())
    }

    fn written(&mut self, writer: Resource<BodyWriter>) -> u64 {
        self.table().get(&writer).map_or(0, |w| w.written)
    }

    fn drop(&mut self, writer: Resource<BodyWriter>) -> wasmtime::Result<()> {
        let _ = self.table().delete(writer);
        Ok(())
    }
}

/// Adds WASI (the sandbox's context: no files, sockets or env), `wasi:http` through the
/// [`NetGrant`], and the shared imports to `linker`; the caller adds its world's own.
pub fn add_shared_imports<W: Send + 'static>(
    linker: &mut wasmtime::component::Linker<NetState<W>>,
) -> anyhow::Result<()> {
    use super::wasm_err;
    use wasmtime::component::HasSelf;
    wasmtime_wasi::p2::add_to_linker_sync(linker).map_err(wasm_err)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_sync(linker).map_err(wasm_err)?;
    wit_types::add_to_linker::<_, HasSelf<_>>(linker, |s| s).map_err(wasm_err)?;
    wit_log::add_to_linker::<_, HasSelf<_>>(linker, |s| s).map_err(wasm_err)?;
    host_files::add_to_linker::<_, HasSelf<_>>(linker, |s| s).map_err(wasm_err)?;
    Ok(())
}
