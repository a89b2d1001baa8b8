//! Native test harness: run a formatter with plain `cargo test` on the host target, through the
//! same config parsing, row parsing and error paths the wasm export uses.

use std::cell::RefCell;

#[cfg(feature = "formatter")]
use crate::formatter::{configure, format_row};
use crate::LogLevel;
#[cfg(feature = "formatter")]
use crate::{Formatter, Sample};

thread_local! {
    static LOGS: RefCell<Vec<(LogLevel, String)>> = const { RefCell::new(Vec::new()) };
}

/// Kept for [`Harness::take_logs`]; also echoed to stderr (shown by `cargo test` on failure).
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(crate) fn record_log(level: LogLevel, message: &str) {
    eprintln!("[{level:?}] {message}");
    LOGS.with(|logs| logs.borrow_mut().push((level, message.to_string())));
}

/// A configured formatter, as the host would have it after `configure`.
#[cfg(feature = "formatter")]
pub struct Harness<F: Formatter> {
    formatter: F,
}

#[cfg(feature = "formatter")]
impl<F: Formatter> Harness<F> {
    /// Configures the formatter with `config` (`serde_json::Value::Null` for no config).
    pub fn new(config: serde_json::Value) -> Result<Self, String> {
        Self::from_config_text(&config.to_string())
    }

    /// Configures the formatter from config JSON text, exactly as the host passes it.
    pub fn from_config_text(config: &str) -> Result<Self, String> {
        Ok(Harness {
            formatter: configure::<F>(config)?,
        })
    }

    /// Formats one row given as a JSON value.
    pub fn format(&self, row: serde_json::Value) -> Result<Sample, String> {
        self.format_text(&row.to_string())
    }

    /// Formats one row given as JSON text (what the host sends).
    pub fn format_text(&self, row: &str) -> Result<Sample, String> {
        format_row(&self.formatter, row)
    }

    /// Formats rows in order, one result each.
    pub fn format_batch<S: AsRef<str>>(&self, rows: &[S]) -> Vec<Result<Sample, String>> {
        rows.iter().map(|r| self.format_text(r.as_ref())).collect()
    }

    /// The log lines written on this thread since the last call.
    pub fn take_logs(&self) -> Vec<(LogLevel, String)> {
        LOGS.with(|logs| std::mem::take(&mut *logs.borrow_mut()))
    }
}
