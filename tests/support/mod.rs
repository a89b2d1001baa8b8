//! Helpers shared by the storage, sync and Kelpie end-to-end tests.
#![allow(dead_code)]

pub mod flaky;
pub mod s3_server;
pub mod tcp_proxy;
pub mod tiny_job;
