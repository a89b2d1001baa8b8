//! Storage backends as plugins: implement [`Storage`] (put/get/list/delete/head of objects by
//! key), export it with [`crate::export_storage!`], build for `wasm32-wasip2`, and pass the
//! `.wasm` to `ferrotune --sync_to`. Bodies are streamed: an upload is a [`BodyReader`] read in
//! chunks, a download a [`BodyWriter`] written in chunks, so a multi-GB checkpoint shard never
//! sits in plugin memory. The network is [`http`] (`wasi:http`), limited by the host to the
//! `host:port` authorities the job allows.
//!
//! ```ignore
//! use ferrotune_plugin_sdk::storage::{self, BodyReader, BodyWriter, Error, ObjectInfo, Storage};
//!
//! #[derive(serde::Deserialize)]
//! struct Config { base_url: String }
//!
//! struct Plain { base: storage::http::Url }
//!
//! impl Storage for Plain {
//!     const NAME: &'static str = "plain-http";
//!     type Config = Config;
//!     fn new(config: Config) -> Result<Self, Error> { /* parse base_url */ }
//!     fn put(&self, key: &str, body: &BodyReader) -> Result<ObjectInfo, Error> { /* PUT */ }
//!     // get, list, delete, head
//! }
//! ferrotune_plugin_sdk::export_storage!(Plain);
//! ```

pub use crate::http;

use serde::de::DeserializeOwned;

use crate::http_bindings::ferrotune::plugin::types::PluginError;
use crate::storage_bindings::exports::ferrotune::plugin::storage_backend as wit;

/// An upload body: a local file the host opened for reading. `read` returns the next chunk
/// (empty at the end).
pub use crate::http::BodyReader;
/// A download target: a local file the host opened for writing, renamed into place only when
/// `get` succeeds.
pub use crate::http::BodyWriter;
/// What a storage call returns on failure (see its variants for how the host treats each).
pub use crate::http::Error;
/// Largest chunk the host hands out per `BodyReader::read`.
pub use crate::http::MAX_CHUNK;

/// One stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the backend's root.
    pub key: String,
    pub size: u64,
    /// Milliseconds since the Unix epoch, when the backend reports it.
    pub modified_ms: Option<u64>,
    /// The backend's entity tag, when it has one.
    pub etag: Option<String>,
}

/// A storage backend. One value per plugin instance, built by [`Storage::new`] from the job's
/// storage config; the host calls one method at a time.
pub trait Storage: Sized + 'static {
    /// Short name shown by `ferrotune plugin inspect` and in the host's log.
    const NAME: &'static str;
    /// The plugin's own version.
    const VERSION: &'static str = "0.1.0";
    /// One line for humans.
    const DESCRIPTION: &'static str = "";
    /// JSON Schema of [`Storage::Config`], if you want `plugin inspect` to show one.
    const CONFIG_SCHEMA: Option<&'static str> = None;

    /// The job's storage config (`--sync_config` key `storage_config`), with `allow_hosts`
    /// removed (the host enforces it) and `secrets` resolved to their values. An absent config
    /// arrives as `{}`.
    type Config: DeserializeOwned;

    fn new(config: Self::Config) -> Result<Self, Error>;
    /// Stores the whole of `body` as `key` and returns what is stored now.
    fn put(&self, key: &str, body: &BodyReader) -> Result<ObjectInfo, Error>;
    /// Writes object `key` into `body`; [`Error::NotFound`] when it does not exist.
    fn get(&self, key: &str, body: &BodyWriter) -> Result<ObjectInfo, Error>;
    /// Every object whose key starts with `prefix` (a string prefix; `""` lists everything).
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, Error>;
    /// Deletes `key`; a missing key is not an error.
    fn delete(&self, key: &str) -> Result<(), Error>;
    /// The object's info, `None` when it does not exist.
    fn head(&self, key: &str) -> Result<Option<ObjectInfo>, Error>;
}

/// Parses the host's config text (`null` → `{}`) into `C`, naming the plugin on failure.
pub fn parse_config<C: DeserializeOwned>(plugin: &str, config: &str) -> Result<C, Error> {
    let mut value: serde_json::Value = serde_json::from_str(config)
        .map_err(|e| Error::InvalidConfig(format!("storage config is not valid JSON: {e}")))?;
    if value.is_null() {
        value = serde_json::Value::Object(Default::default());
    }
    serde::Deserialize::deserialize(value)
        .map_err(|e| Error::InvalidConfig(format!("storage config of {plugin}: {e}")))
}

/// The glue behind [`crate::export_storage!`]; generic so that it is written once.
#[doc(hidden)]
pub mod __glue {
    use super::*;

    fn ready<S: Storage>(backend: Option<&S>) -> Result<&S, PluginError> {
        backend.ok_or_else(|| PluginError::Other(format!("{}: called before configure", S::NAME)))
    }

    fn to_wit(info: ObjectInfo) -> wit::ObjectInfo {
        wit::ObjectInfo {
            key: info.key,
            size: info.size,
            modified_ms: info.modified_ms,
            etag: info.etag,
        }
    }

    pub fn describe<S: Storage>() -> wit::PluginInfo {
        wit::PluginInfo {
            name: S::NAME.to_string(),
            version: S::VERSION.to_string(),
            description: S::DESCRIPTION.to_string(),
            config_schema: S::CONFIG_SCHEMA.map(str::to_string),
        }
    }

    pub fn configure<S: Storage>(config: &str) -> Result<S, PluginError> {
        Ok(S::new(parse_config(S::NAME, config)?)?)
    }

    pub fn put<S: Storage>(
        backend: Option<&S>,
        key: &str,
        body: &BodyReader,
    ) -> Result<wit::ObjectInfo, PluginError> {
        Ok(to_wit(ready(backend)?.put(key, body)?))
    }

    pub fn get<S: Storage>(
        backend: Option<&S>,
        key: &str,
        body: &BodyWriter,
    ) -> Result<wit::ObjectInfo, PluginError> {
        Ok(to_wit(ready(backend)?.get(key, body)?))
    }

    pub fn list<S: Storage>(
        backend: Option<&S>,
        prefix: &str,
    ) -> Result<Vec<wit::ObjectInfo>, PluginError> {
        Ok(ready(backend)?
            .list(prefix)?
            .into_iter()
            .map(to_wit)
            .collect())
    }

    pub fn delete<S: Storage>(backend: Option<&S>, key: &str) -> Result<(), PluginError> {
        Ok(ready(backend)?.delete(key)?)
    }

    pub fn head<S: Storage>(
        backend: Option<&S>,
        key: &str,
    ) -> Result<Option<wit::ObjectInfo>, PluginError> {
        Ok(ready(backend)?.head(key)?.map(to_wit))
    }
}

/// Exports a [`Storage`] as the component's `storage-backend` interface. The configured
/// backend lives in a per-instance slot; a call before `configure` is an error value.
#[macro_export]
macro_rules! export_storage {
    ($backend:ty) => {
        const _: () = {
            use $crate::storage::__glue as __glue;
            use $crate::storage_bindings::exports::ferrotune::plugin::storage_backend as __wit;

            struct FerrotuneStorageExport;

            ::std::thread_local! {
                static CONFIGURED: ::std::cell::RefCell<::std::option::Option<$backend>> =
                    const { ::std::cell::RefCell::new(::std::option::Option::None) };
            }

            impl __wit::Guest for FerrotuneStorageExport {
                fn describe() -> __wit::PluginInfo {
                    __glue::describe::<$backend>()
                }

                fn configure(
                    config: ::std::string::String,
                ) -> ::std::result::Result<(), __wit::PluginError> {
                    let backend = __glue::configure::<$backend>(&config)?;
                    CONFIGURED.with(|slot| *slot.borrow_mut() = ::std::option::Option::Some(backend));
                    ::std::result::Result::Ok(())
                }

                fn put(
                    key: ::std::string::String,
                    body: &__wit::BodyReader,
                ) -> ::std::result::Result<__wit::ObjectInfo, __wit::PluginError> {
                    CONFIGURED.with(|slot| __glue::put(slot.borrow().as_ref(), &key, body))
                }

                fn get(
                    key: ::std::string::String,
                    body: &__wit::BodyWriter,
                ) -> ::std::result::Result<__wit::ObjectInfo, __wit::PluginError> {
                    CONFIGURED.with(|slot| __glue::get(slot.borrow().as_ref(), &key, body))
                }

                fn list(
                    prefix: ::std::string::String,
                ) -> ::std::result::Result<::std::vec::Vec<__wit::ObjectInfo>, __wit::PluginError> {
                    CONFIGURED.with(|slot| __glue::list(slot.borrow().as_ref(), &prefix))
                }

                fn delete(
                    key: ::std::string::String,
                ) -> ::std::result::Result<(), __wit::PluginError> {
                    CONFIGURED.with(|slot| __glue::delete(slot.borrow().as_ref(), &key))
                }

                fn head(
                    key: ::std::string::String,
                ) -> ::std::result::Result<::std::option::Option<__wit::ObjectInfo>, __wit::PluginError> {
                    CONFIGURED.with(|slot| __glue::head(slot.borrow().as_ref(), &key))
                }
            }

            // Only wasm exports the ABI symbols (see `export_formatter!`).
            #[cfg(target_arch = "wasm32")]
            $crate::storage_bindings::__export_storage_world!(FerrotuneStorageExport with_types_in $crate::storage_bindings);
        };
    };
}
