//! Dataset rows → training batches.

pub mod sample;
