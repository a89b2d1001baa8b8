//! Helpers shared by the storage, sync, publish and Kelpie end-to-end tests.
#![allow(dead_code)]

pub mod dav_server;
pub mod fake_hub;
pub mod flaky;
pub mod s3_server;
pub mod scaffold;
pub mod tcp_proxy;
pub mod tiny_job;

use ferrotune::storage::ObjectStore;

/// Deterministic bytes that differ per position (so a misplaced part or chunk is caught).
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 4099) as u8).collect()
}

/// The keys `store` lists under `prefix`.
pub fn keys(store: &dyn ObjectStore, prefix: &str) -> Vec<String> {
    store
        .list(prefix)
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect()
}
