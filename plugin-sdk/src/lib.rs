//! Guest SDK for ferrotune plugins: write a per-row [`Formatter`], export it with
//! [`export_formatter!`], compile with `cargo build --release --target wasm32-wasip2`, and pass
//! the `.wasm` to `ferrotune --formatter`. The SDK owns the batched ABI of the WIT world
//! `ferrotune:plugin/formatter` (JSON parsing, config, error values), so a plugin is only the
//! mapping from one row to one [`Sample`]. Unit tests run natively through [`testing::Harness`].
//!
//! ```ignore
//! use ferrotune_plugin_sdk::{export_formatter, Formatter, Sample};
//!
//! #[derive(serde::Deserialize, Default)]
//! #[serde(default)]
//! struct Config { column: Option<String> }
//!
//! struct Upper { column: String }
//!
//! impl Formatter for Upper {
//!     const NAME: &'static str = "upper";
//!     type Config = Config;
//!     type Row = ferrotune_plugin_sdk::JsonRow;
//!     fn new(config: Config) -> Result<Self, String> {
//!         Ok(Upper { column: config.column.unwrap_or_else(|| "text".into()) })
//!     }
//!     fn format(&self, row: Self::Row) -> Result<Sample, String> {
//!         Ok(Sample::text(row.str(&self.column)?.to_uppercase()))
//!     }
//! }
//! export_formatter!(Upper);
//! ```
//!
//! Other plugin kinds have one cargo feature each (a plugin depends on the SDK with
//! `default-features = false` and exactly one of them, since a component carries one world):
//! `storage` (a whole object store, module `storage`), `sync` (a sync policy: events in, actions
//! out, module `sync`, `export_sync_policy!`) and `publish`.

// The generated bindings name this crate by its public path so that the export macro, which
// expands inside the plugin crate, resolves the same items.
extern crate self as ferrotune_plugin_sdk;

#[cfg(feature = "formatter")]
mod formatter;
#[cfg(any(feature = "storage", feature = "publish"))]
pub mod http;
pub mod log;
#[cfg(feature = "publish")]
pub mod publish;
pub mod row;
mod sample;
#[cfg(feature = "storage")]
pub mod storage;
#[cfg(feature = "sync")]
pub mod sync;
pub mod testing;

#[cfg(feature = "formatter")]
pub use formatter::Formatter;
pub use log::LogLevel;
pub use row::JsonRow;
pub use sample::{Message, Sample};
pub use serde;
pub use serde_json;

/// The WIT world version this SDK builds plugins against.
pub const WORLD_VERSION: &str = "0.1.0";

/// Generated bindings for the `formatter` world. Not part of the SDK's API.
#[cfg(feature = "formatter")]
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "ferrotune:plugin/formatter",
        pub_export_macro: true,
        export_macro_name: "__export_formatter_world",
        default_bindings_module: "ferrotune_plugin_sdk::bindings",
        runtime_path: "ferrotune_plugin_sdk::bindings::__wit_bindgen::rt",
    });
    pub use wit_bindgen as __wit_bindgen;
}

/// Generated bindings of what the `storage` and `publish` worlds both import (`wasi:http`, the
/// `log`, `types` and `host-files` interfaces), generated once so that both worlds' bindings
/// share them (`with`) and one HTTP client ([`http`]) serves both. Not part of the SDK's API.
#[cfg(any(feature = "storage", feature = "publish"))]
#[doc(hidden)]
pub mod http_bindings {
    wit_bindgen::generate!({
        inline: "
            package ferrotune:sdk-net;
            world shared-imports {
                import ferrotune:plugin/log@0.1.0;
                import ferrotune:plugin/host-files@0.1.0;
                import wasi:http/outgoing-handler@0.2.12;
            }
        ",
        path: "../wit",
        runtime_path: "ferrotune_plugin_sdk::http_bindings::__wit_bindgen::rt",
        generate_all,
    });
    pub use wit_bindgen as __wit_bindgen;
}

/// Bindings for a world that imports `wasi:http` (storage, publish): its shared imports map
/// onto [`http_bindings`], so one http client serves every such world. Not part of the SDK's
/// API; plugins use [`storage`] / [`publish`].
macro_rules! net_world_bindings {
    ($module:ident, $feature:literal, $world:literal, $export_macro:literal, $module_path:literal, $runtime_path:literal) => {
        #[cfg(feature = $feature)]
        #[doc(hidden)]
        pub mod $module {
            wit_bindgen::generate!({
                path: "../wit",
                world: $world,
                pub_export_macro: true,
                export_macro_name: $export_macro,
                default_bindings_module: $module_path,
                runtime_path: $runtime_path,
                generate_all,
                with: {
                    "wasi:http/types@0.2.12": crate::http_bindings::wasi::http::types,
                    "wasi:http/outgoing-handler@0.2.12": crate::http_bindings::wasi::http::outgoing_handler,
                    "wasi:io/error@0.2.12": crate::http_bindings::wasi::io::error,
                    "wasi:io/poll@0.2.12": crate::http_bindings::wasi::io::poll,
                    "wasi:io/streams@0.2.12": crate::http_bindings::wasi::io::streams,
                    "wasi:clocks/monotonic-clock@0.2.12": crate::http_bindings::wasi::clocks::monotonic_clock,
                    "ferrotune:plugin/types@0.1.0": crate::http_bindings::ferrotune::plugin::types,
                    "ferrotune:plugin/log@0.1.0": crate::http_bindings::ferrotune::plugin::log,
                    "ferrotune:plugin/host-files@0.1.0": crate::http_bindings::ferrotune::plugin::host_files,
                },
            });
            pub use wit_bindgen as __wit_bindgen;
        }
    };
}

net_world_bindings!(
    storage_bindings,
    "storage",
    "ferrotune:plugin/storage",
    "__export_storage_world",
    "ferrotune_plugin_sdk::storage_bindings",
    "ferrotune_plugin_sdk::storage_bindings::__wit_bindgen::rt"
);
net_world_bindings!(
    publish_bindings,
    "publish",
    "ferrotune:plugin/publish",
    "__export_publish_world",
    "ferrotune_plugin_sdk::publish_bindings",
    "ferrotune_plugin_sdk::publish_bindings::__wit_bindgen::rt"
);

/// What the export macro calls; generic so that the ABI glue is written (and tested) once.
#[cfg(feature = "formatter")]
#[doc(hidden)]
pub mod __private {
    pub use crate::formatter::{configure, describe, format_batch};
}

/// Exports a [`Formatter`] as the component's `format` interface.
///
/// Expands to the WIT glue: `describe`, `configure` (once per instance, with the job's JSON
/// config) and `format-batch` (one `result<sample, string>` per row, same order). The
/// configured formatter lives in a per-instance slot; a batch before `configure` gives one
/// error per row instead of trapping.
#[cfg(feature = "formatter")]
#[macro_export]
macro_rules! export_formatter {
    ($formatter:ty) => {
        const _: () = {
            use $crate::bindings::exports::ferrotune::plugin::format as __wit;

            struct FerrotuneFormatterExport;

            ::std::thread_local! {
                static CONFIGURED: ::std::cell::RefCell<::std::option::Option<$formatter>> =
                    const { ::std::cell::RefCell::new(::std::option::Option::None) };
            }

            impl __wit::Guest for FerrotuneFormatterExport {
                fn describe() -> __wit::PluginInfo {
                    $crate::__private::describe::<$formatter>()
                }

                fn configure(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                    let formatter = $crate::__private::configure::<$formatter>(&config)?;
                    CONFIGURED.with(|slot| *slot.borrow_mut() = ::std::option::Option::Some(formatter));
                    ::std::result::Result::Ok(())
                }

                fn format_batch(
                    rows: ::std::vec::Vec<::std::string::String>,
                ) -> ::std::vec::Vec<::std::result::Result<__wit::Sample, ::std::string::String>> {
                    CONFIGURED.with(|slot| {
                        $crate::__private::format_batch::<$formatter>(slot.borrow().as_ref(), &rows)
                    })
                }
            }

            // Only wasm exports the ABI symbols: their names ("ferrotune:plugin/format@0.1.0#...")
            // are not valid in native linker scripts, and native builds only run unit tests.
            #[cfg(target_arch = "wasm32")]
            $crate::bindings::__export_formatter_world!(FerrotuneFormatterExport with_types_in $crate::bindings);
        };
    };
}
