//! `http-store`: a WebDAV server (Apache mod_dav, nginx dav, rclone serve webdav, wsgidav, …) as
//! a ferrotune object store, written against the SDK's storage world only — no host rebuild.
//!
//! Keys map to paths under `base_url`: PUT stores (MKCOL creates missing parent collections
//! first), GET fetches, HEAD reads the size, DELETE removes, PROPFIND `Depth: 1` walks
//! collections for listings. Bodies stream through the host's file resources in chunks. Basic
//! auth from `username` + `secrets.password`.
//!
//! Config (the `storage_config` of `--sync_config`):
//! `{"base_url": "https://dav.example.com/ckpts", "username": "u", "secrets": {"password": "…"},
//!   "allow_hosts": ["dav.example.com:443"]}` — `allow_hosts` is read by the host, which also
//! removes it before the plugin sees the config.

mod propfind;
mod webdav;

pub use propfind::{parse_http_date, parse_multistatus, Entry};
pub use webdav::{Config, Secrets, WebDav};

ferrotune_plugin_sdk::export_storage!(WebDav);
