//! Pushes ferrotune's artefacts (the merged or adapter save, GGUF files) to a Hugging Face-
//! compatible Hub: create the repository if missing, upload small files inline and large ones
//! through the Hub's LFS protocol, all in one commit ([`hub`]).
//!
//! The protocol code is independent of how bytes move: [`hub::Transport`] sends a request and
//! [`hub::FileSource`] opens a file. The `publish`-world plugin (`wasi:http` transport, the
//! host's `open-artefact` files) is built on it; the tests drive it over plain TCP against a
//! fake Hub (`tests/python/fake_hub_upload.py`).

pub mod hub;

/// The `publish`-world export (`hf-hub`), embedded in ferrotune as a built-in plugin.
pub mod plugin;
