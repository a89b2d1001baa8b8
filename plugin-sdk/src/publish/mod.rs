//! The `publish` world for plugin authors: implement [`Publisher`] (receive the run's artefacts,
//! push them somewhere), export it with [`crate::export_publisher!`]. Files are read through the
//! host ([`open_artefact`], streamed in chunks, never from the file system) and the network is
//! `wasi:http` only ([`http`]), limited by the host to the hosts the job allows.

pub mod http;

use std::io::Read;

use serde::de::DeserializeOwned;

use crate::publish_bindings::exports::ferrotune::plugin::publish_steps as wit;
use crate::publish_bindings::ferrotune::plugin::open_artefact;

pub use crate::http::{BodyReader, MAX_CHUNK};
pub use crate::http_bindings::ferrotune::plugin::types::{
    Artefact, ArtefactKind, FileInfo, PluginError,
};

/// A publish step, one instance per job.
pub trait Publisher: Sized + 'static {
    const NAME: &'static str;
    const VERSION: &'static str;
    const DESCRIPTION: &'static str;
    /// The JSON configuration the host passes to `configure` (secrets included: use them, never
    /// log them).
    type Config: DeserializeOwned;

    fn new(config: Self::Config) -> Result<Self, PluginError>;

    /// Pushes `artefacts`; returns URLs or ids for the host's log.
    fn publish(&self, artefacts: &[Artefact]) -> Result<Vec<String>, PluginError>;
}

/// A file of an artefact, opened by the host and read in chunks of at most [`MAX_CHUNK`].
pub struct ArtefactReader {
    body: BodyReader,
    pending: Vec<u8>,
    offset: usize,
}

impl ArtefactReader {
    pub fn size(&self) -> u64 {
        self.body.size()
    }
}

impl Read for ArtefactReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.offset == self.pending.len() {
            self.pending = self
                .body
                .read(MAX_CHUNK)
                .map_err(|e| std::io::Error::other(error_text(&e)))?;
            self.offset = 0;
        }
        let n = buf.len().min(self.pending.len() - self.offset);
        buf[..n].copy_from_slice(&self.pending[self.offset..self.offset + n]);
        self.offset += n;
        Ok(n)
    }
}

/// Opens `path` (an artefact file the host listed) for reading.
pub fn open_artefact(path: &str) -> Result<ArtefactReader, PluginError> {
    Ok(ArtefactReader {
        body: open_artefact::open(path)?,
        pending: Vec::new(),
        offset: 0,
    })
}

/// The message of a [`PluginError`].
pub fn error_text(e: &PluginError) -> String {
    match e {
        PluginError::InvalidConfig(m)
        | PluginError::NotFound(m)
        | PluginError::Denied(m)
        | PluginError::Other(m) => m.clone(),
    }
}

/// The glue behind [`crate::export_publisher!`].
#[doc(hidden)]
pub mod __glue {
    use super::*;

    pub fn describe<P: Publisher>() -> wit::PluginInfo {
        wit::PluginInfo {
            name: P::NAME.to_string(),
            version: P::VERSION.to_string(),
            description: P::DESCRIPTION.to_string(),
            config_schema: None,
        }
    }

    pub fn configure<P: Publisher>(config: &str) -> Result<P, PluginError> {
        let config: P::Config = serde_json::from_str(config).map_err(|e| {
            PluginError::InvalidConfig(format!("publish config of {}: {e}", P::NAME))
        })?;
        P::new(config)
    }

    pub fn publish<P: Publisher>(
        publisher: Option<&P>,
        artefacts: &[Artefact],
    ) -> Result<Vec<String>, PluginError> {
        publisher
            .ok_or_else(|| PluginError::Other(format!("{}: called before configure", P::NAME)))?
            .publish(artefacts)
    }
}

/// Exports a [`Publisher`] as the component's `publish-steps` interface.
#[macro_export]
macro_rules! export_publisher {
    ($publisher:ty) => {
        const _: () = {
            use $crate::publish::__glue as __glue;
            use $crate::publish_bindings::exports::ferrotune::plugin::publish_steps as __wit;

            struct FerrotunePublishExport;

            ::std::thread_local! {
                static CONFIGURED: ::std::cell::RefCell<::std::option::Option<$publisher>> =
                    const { ::std::cell::RefCell::new(::std::option::Option::None) };
            }

            impl __wit::Guest for FerrotunePublishExport {
                fn describe() -> __wit::PluginInfo {
                    __glue::describe::<$publisher>()
                }

                fn configure(
                    config: ::std::string::String,
                ) -> ::std::result::Result<(), __wit::PluginError> {
                    let publisher = __glue::configure::<$publisher>(&config)?;
                    CONFIGURED.with(|slot| *slot.borrow_mut() = ::std::option::Option::Some(publisher));
                    ::std::result::Result::Ok(())
                }

                fn publish(
                    artefacts: ::std::vec::Vec<__wit::Artefact>,
                ) -> ::std::result::Result<::std::vec::Vec<::std::string::String>, __wit::PluginError> {
                    CONFIGURED.with(|slot| __glue::publish(slot.borrow().as_ref(), &artefacts))
                }
            }

            // Only wasm exports the ABI symbols (see `export_formatter!`).
            #[cfg(target_arch = "wasm32")]
            $crate::publish_bindings::__export_publish_world!(FerrotunePublishExport with_types_in $crate::publish_bindings);
        };
    };
}

/// An info line in the host's log, tagged with the plugin's name.
pub fn log(message: &str) {
    crate::log::write(crate::LogLevel::Info, message);
}
