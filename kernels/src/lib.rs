//! CUDA kernels for ferrotune (DESIGN.md §2, issue "CUDA engine").
//!
//! The kernels are CUDA C++ sources in `kernels/cuda/`, embedded in the binary
//! ([`sources`]) and compiled at run time by NVRTC for the device's compute capability
//! ([`arch`]), with the resulting cubins cached on disk ([`cache`]). Nothing here needs a CUDA
//! toolkit at build time: with the `cuda` feature, cudarc loads libcuda and libnvrtc
//! dynamically ([`nvrtc`], [`device`]).
//!
//! Without the `cuda` feature the crate still provides what the host shares with the GPU path:
//! the quantisation tables ([`quant`]), rotary frequencies ([`rope`]) and the plain-Rust
//! reference implementation of every kernel ([`reference`]), which the parity tool and the
//! tests compare the GPU against.

pub mod arch;
pub mod cache;
pub mod ptxas;
pub mod quant;
pub mod reference;
pub mod rope;
pub mod sources;

#[cfg(feature = "cuda")]
pub mod device;
#[cfg(feature = "cuda")]
pub mod nvrtc;

#[cfg(feature = "cuda")]
mod error;
#[cfg(feature = "cuda")]
pub use error::KernelError;

/// Target value meaning "no loss for this row" (PyTorch's -100).
pub const IGNORE_INDEX: i32 = -100;
