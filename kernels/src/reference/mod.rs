//! Plain-Rust reference implementations of every kernel, for parity tests (GPU vs CPU on random
//! inputs) and for the unit tests that pin down each kernel's math without a GPU.
//!
//! Inputs are f32 slices holding the values the GPU sees (bf16 inputs already rounded).
//! Floating-point work that the kernels do in fp32 with fp32 results that must match bit for bit
//! (optimizers, quantisation) is emulated exactly in f32; the rest is computed in f64 and
//! compared with a tolerance.

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod dropout;
pub mod nf4;
pub mod norm;
pub mod reduce;
pub mod rope;
pub mod swiglu;

/// Rounds to the nearest bf16 (ties to even), as the kernels' stores do.
pub fn bf16_round(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}
