//! Helpers shared by the storage and Kelpie end-to-end tests.
#![allow(dead_code)]

pub mod flaky;
pub mod s3_server;
