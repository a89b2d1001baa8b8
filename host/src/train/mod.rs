//! Training: the backend-independent loop ([`trainer`]), how many steps and which lr
//! ([`plan`]), progress and its checkpoint forms ([`state`]), metrics sinks ([`report`],
//! [`tensorboard`]) and the whole job from flags to saved adapter ([`job`]).

pub mod job;
pub mod plan;
pub mod report;
pub mod state;
pub mod tensorboard;
#[cfg(test)]
mod tests;
pub mod trainer;

pub use job::{run_job, run_job_with, JobReport, RunOptions};
pub use plan::Plan;
pub use state::RunState;
pub use trainer::{Outcome, Trainer};
