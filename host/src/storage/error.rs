//! Storage failures, classified so that callers know whether waiting helps.

use std::path::Path;

/// Why a storage call failed. Messages name the object, the store and — for settings problems —
/// the variable or flag to fix; they never contain a secret.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The object (or, for S3, the bucket) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The settings are wrong (bad URL, missing or rejected credentials, missing bucket); retrying
    /// cannot help.
    #[error("{0}")]
    Config(String),
    /// The store could not be reached or kept failing (network, timeouts, throttling, 5xx) after
    /// the backend's own retries; a later attempt may succeed.
    #[error("{0}")]
    Transient(String),
    /// What arrived is not what was sent (size or checksum mismatch).
    #[error("{0}")]
    Integrity(String),
    /// A local file could not be read or written.
    #[error("{what} {path}: {source}")]
    Local {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
}

impl StorageError {
    /// Whether a later attempt of the same call may succeed (sync keeps retrying these).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StorageError::Transient(_) | StorageError::Integrity(_)
        )
    }

    pub(crate) fn local(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        StorageError::Local {
            what,
            path: path.display().to_string(),
            source,
        }
    }
}
