//! ferrotune: a LoRA/QLoRA fine-tuning host. The binary's modules, in the order data flows
//! through them (DESIGN.md §1): `cli` → `job` → data → engine → checkpoint → export → publish.

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod demo;
pub mod engine;
pub mod export;
pub mod gguf;
pub mod hub;
pub mod job;
pub mod kelpie;
pub mod logging;
pub mod model;
pub mod optim;
pub mod plugin;
pub mod precompile;
pub mod run;
pub mod signals;
pub mod storage;
pub mod sync;
pub mod train;
