//! Object storage behind one host trait. Native backends: `file:///path` (a directory) and
//! `s3://bucket/prefix` (AWS S3 and S3-compatible stores such as R2 or MinIO through
//! `AWS_ENDPOINT_URL`); any other backend as a storage plugin, `PATH.wasm`
//! ([`crate::plugin::storage_host`]). Sync and the rest of the host see only [`ObjectStore`], so
//! they cannot tell backends apart.
//!
//! Every store is *rooted*: keys are relative to the URL's path/prefix, `/`-separated, and are
//! validated by [`key::check`] before any backend sees them.

mod error;
pub mod file;
pub mod key;
mod location;
pub mod s3;
pub(crate) mod transfer;

use std::path::Path;

pub use error::StorageError;
pub(crate) use location::expand_job_id;
pub use location::StorageUrl;
pub use transfer::sync_dir;

/// What a backend knows about one stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the store's root.
    pub key: String,
    pub size: u64,
    /// The backend's entity tag, when it has one (S3: quoted MD5 or multipart ETag).
    pub etag: Option<String>,
    /// Milliseconds since the Unix epoch, when the backend reports it.
    pub modified_ms: Option<u64>,
}

/// A storage backend. Calls block the calling thread (sync runs them on its own worker thread,
/// never on the training thread). Downloads land atomically: the destination file appears only
/// complete. Implementations retry transient failures themselves before reporting them.
pub trait ObjectStore: Send + Sync {
    /// The store's URL for logs and messages (never contains a secret).
    fn url(&self) -> &str;
    /// Uploads the local file `src` as `key` (multipart for large files) and returns the
    /// stored object's info after checking its size.
    fn put_file(&self, key: &str, src: &Path) -> Result<ObjectInfo, StorageError>;
    /// Downloads `key` into `dest` (written to a temporary sibling, fsynced, renamed).
    fn get_file(&self, key: &str, dest: &Path) -> Result<ObjectInfo, StorageError>;
    /// Every object whose key starts with `prefix` (`""` lists the whole store), sorted by key.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError>;
    /// Deletes `key`; deleting a missing key is not an error.
    fn delete(&self, key: &str) -> Result<(), StorageError>;
    /// The object's info, or `None` when it does not exist.
    fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError>;
}

/// Opens the backend a storage URL names. `{job_id}` in the URL is replaced by `KELPIE_JOB_ID`.
/// A storage plugin gets an empty config; see [`open_with`].
pub fn open(url: &str) -> Result<Box<dyn ObjectStore>, StorageError> {
    open_with(url, None, crate::plugin::PluginLimits::default())
}

/// Opens the backend a storage URL names; a storage plugin (`PATH.wasm`) is configured with
/// `plugin_config` (`--sync_config` key `storage_config`) and runs under `limits`. Giving a
/// config to a native backend is an error (it would be silently ignored).
pub fn open_with(
    url: &str,
    plugin_config: Option<&serde_json::Value>,
    limits: crate::plugin::PluginLimits,
) -> Result<Box<dyn ObjectStore>, StorageError> {
    let parsed = StorageUrl::parse(url)?;
    if plugin_config.is_some() && !matches!(parsed, StorageUrl::Plugin { .. }) {
        return Err(StorageError::Config(format!(
            "--sync_config storage_config is for storage plugins (PATH.wasm), but the storage \
             is {url:?}; remove storage_config"
        )));
    }
    match parsed {
        StorageUrl::File { root } => Ok(Box::new(file::FileStore::new(root)?)),
        StorageUrl::S3 { bucket, prefix } => {
            let settings = s3::S3Settings::from_env()?;
            Ok(Box::new(s3::S3Store::connect(&bucket, &prefix, settings)?))
        }
        StorageUrl::Plugin { path } => {
            use crate::plugin::storage_config::NetPluginConfig;
            let config = NetPluginConfig::parse(plugin_config)?;
            let runtime = crate::plugin::PluginRuntime::new(limits)
                .map_err(|e| StorageError::Config(format!("storage plugin {url}: {e:#}")))?;
            Ok(Box::new(crate::plugin::storage_host::PluginStore::open(
                &runtime, &path, config,
            )?))
        }
    }
}
