//! Logging from a plugin: on wasm the lines go to the host's log tagged with the plugin's name;
//! in native tests they are kept by [`crate::testing`] (and echoed to stderr).

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// Writes one log line. Prefer the macros ([`crate::info!`], [`crate::warn!`], ...).
pub fn write(level: LogLevel, message: &str) {
    #[cfg(all(target_arch = "wasm32", feature = "formatter"))]
    use crate::bindings::ferrotune::plugin as wit;
    #[cfg(all(
        target_arch = "wasm32",
        any(feature = "storage", feature = "publish"),
        not(feature = "formatter")
    ))]
    use crate::http_bindings::ferrotune::plugin as wit;
    #[cfg(all(
        target_arch = "wasm32",
        feature = "sync",
        not(any(feature = "formatter", feature = "storage", feature = "publish"))
    ))]
    use crate::sync::bindings::ferrotune::plugin as wit;
    #[cfg(target_arch = "wasm32")]
    {
        use wit::types::LogLevel as Wit;
        let level = match level {
            LogLevel::Trace => Wit::Trace,
            LogLevel::Debug => Wit::Debug,
            LogLevel::Info => Wit::Info,
            LogLevel::Warn => Wit::Warn,
            LogLevel::Error => Wit::Error,
        };
        wit::log::log(level, message);
    }
    #[cfg(not(target_arch = "wasm32"))]
    crate::testing::record_log(level, message);
}

#[macro_export]
macro_rules! trace {
    ($($arg:tt)*) => { $crate::log::write($crate::LogLevel::Trace, &::std::format!($($arg)*)) };
}
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log::write($crate::LogLevel::Debug, &::std::format!($($arg)*)) };
}
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::write($crate::LogLevel::Info, &::std::format!($($arg)*)) };
}
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log::write($crate::LogLevel::Warn, &::std::format!($($arg)*)) };
}
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log::write($crate::LogLevel::Error, &::std::format!($($arg)*)) };
}
