//! WASM plugins (DESIGN.md §4): wasmtime components loaded per job, sandboxed (no env, no files,
//! no sockets, memory limit, per-call deadline), with the built-in formatters embedded in the
//! binary. `runtime` owns the Engine and the compiled-component cache, `world` reads which
//! plugin kind and WIT version a component implements, `sandbox` builds the per-instance Store,
//! `formatter` is the API the data pipeline calls, `scaffold`/`inspect` back the `ferrotune
//! plugin` subcommands.

mod bindings;
pub mod builtin;
mod cache;
pub mod command;
pub mod formatter;
pub mod inspect;
mod net_grant;
mod net_state;
mod output;
pub mod publish_host;
mod runtime;
pub(crate) mod sandbox;
pub mod scaffold;
pub mod storage_config;
pub mod storage_host;
pub mod sync_policy;
pub mod wasm_profile;
pub mod world;

/// wasmtime 48 has its own error type; the host speaks anyhow. The conversion keeps the whole
/// chain as text (callers that need the trap kind inspect the wasmtime error first).
pub(crate) fn wasm_err(e: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!("{e:#}")
}

/// The name a plugin file goes by in logs and errors: its file name, else the whole path.
pub(crate) fn file_label(path: &std::path::Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

pub use formatter::{format_rows, format_rows_with, FormatOptions, FormatterPlugin};
pub use runtime::{PluginLimits, PluginRuntime};
