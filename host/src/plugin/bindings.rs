//! Host bindings, one module per WIT version the host can load. A released version is frozen:
//! when `wit/` moves to a new version, the old files move to `wit/released/vX.Y.Z/` and get a
//! module here, and `world::SUPPORTED_VERSIONS` lists them (as Zed does with `since_vX`).

/// `ferrotune:plugin@0.1.0`, the current version (`wit/`).
pub mod v0_1_0 {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "ferrotune:plugin/formatter",
    });
}

mod v0_1_0_imports {
    use super::v0_1_0::ferrotune::plugin::{log, types};
    use crate::plugin::sandbox::PluginState;

    impl types::Host for PluginState {}

    /// `log` lines go to the host log, tagged with the plugin's name.
    impl log::Host for PluginState {
        fn log(&mut self, level: types::LogLevel, message: String) {
            super::emit(&self.plugin, level, &message);
        }
    }
}

/// Writes a plugin's `log` line to the host log, tagged with the plugin's name. Every world's
/// bindings map `ferrotune:plugin/types` and `log` to [`v0_1_0`]'s (`with`), so this one
/// function serves them all.
pub(crate) fn emit(plugin: &str, level: v0_1_0::ferrotune::plugin::types::LogLevel, message: &str) {
    use v0_1_0::ferrotune::plugin::types::LogLevel;
    match level {
        LogLevel::Trace => tracing::trace!(plugin, "{message}"),
        LogLevel::Debug => tracing::debug!(plugin, "{message}"),
        LogLevel::Info => tracing::info!(plugin, "{message}"),
        LogLevel::Warn => tracing::warn!(plugin, "{message}"),
        LogLevel::Error => tracing::error!(plugin, "{message}"),
    }
}
