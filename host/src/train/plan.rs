//! How many optimizer steps a job runs and what each one covers.
//!
//! An epoch of `B` micro-batches is cut into ⌈B / GA⌉ accumulation windows of up to GA
//! micro-batches (the last may be shorter, as transformers ≥ 4.46 does); windows never cross an
//! epoch boundary, so a data position after any step is `(epoch, k·GA)` and a resumed run cuts
//! the same windows. `--max_steps N > 0` runs N steps, cycling epochs as needed; otherwise
//! ⌈num_train_epochs · steps per epoch⌉ steps.
//!
//! With data parallelism over `world` devices a window holds GA · world micro-batches (each
//! rank trains on its share of it), so the effective batch is
//! `per_device_train_batch_size × GA × world` and the data position stays global.

use crate::job::JobConfig;
use crate::optim::schedule::{self, Schedule};

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub micro_batches_per_epoch: usize,
    /// Micro-batches per optimizer step over all ranks: `--gradient_accumulation_steps × world`.
    pub gradient_accumulation_steps: usize,
    /// Devices a window is spread over (data parallelism; 1 otherwise).
    pub world_size: usize,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    /// Epochs the run spans (what trainer_state.json calls num_train_epochs).
    pub num_train_epochs: u64,
    pub schedule: Schedule,
}

impl Plan {
    pub fn new(
        job: &JobConfig,
        micro_batches_per_epoch: usize,
        world_size: usize,
    ) -> Result<Self, String> {
        let t = &job.training;
        let world_size = world_size.max(1);
        let ga = t.gradient_accumulation_steps.max(1) * world_size;
        let steps_per_epoch = micro_batches_per_epoch.div_ceil(ga).max(1) as u64;
        let total_steps = if t.max_steps > 0 {
            t.max_steps as u64
        } else {
            let epochs = t.num_train_epochs.unwrap_or(3.0);
            ((epochs * steps_per_epoch as f64).ceil() as u64).max(1)
        };
        let warmup = schedule::warmup_steps(t.warmup_steps, t.warmup_ratio, total_steps);
        let schedule = Schedule::new(t.lr_scheduler_type, t.learning_rate, warmup, total_steps);
        schedule.validate()?;
        Ok(Self {
            micro_batches_per_epoch,
            gradient_accumulation_steps: ga,
            world_size,
            steps_per_epoch,
            total_steps,
            num_train_epochs: total_steps.div_ceil(steps_per_epoch),
            schedule,
        })
    }

    /// Micro-batches in the window that starts at micro-batch `index` of an epoch.
    pub fn window_len(&self, index: u64) -> usize {
        let left = self.micro_batches_per_epoch as u64 - index;
        left.min(self.gradient_accumulation_steps as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(args: &[&str]) -> JobConfig {
        let mut argv = vec!["ferrotune"];
        argv.extend_from_slice(args);
        crate::train::tests::parse_job(&argv)
    }

    #[test]
    fn max_steps_wins_and_epochs_round_up_partial_windows() {
        let p = Plan::new(
            &job(&["--max_steps", "7", "--gradient_accumulation_steps", "4"]),
            10,
            1,
        )
        .unwrap();
        assert_eq!(
            (p.steps_per_epoch, p.total_steps, p.num_train_epochs),
            (3, 7, 3)
        );
        assert_eq!(
            (p.window_len(0), p.window_len(4), p.window_len(8)),
            (4, 4, 2)
        );
        assert_eq!(p.schedule.warmup_steps, 5);

        let mut j = job(&[
            "--gradient_accumulation_steps",
            "4",
            "--warmup_steps",
            "0",
            "--warmup_ratio",
            "0.1",
        ]);
        j.training.max_steps = -1;
        j.training.num_train_epochs = Some(2.5);
        let p = Plan::new(&j, 10, 1).unwrap();
        assert_eq!((p.total_steps, p.num_train_epochs), (8, 3));
        assert_eq!(p.schedule.warmup_steps, 1);
    }

    #[test]
    fn data_parallel_windows_span_every_rank() {
        // 2 ranks × GA 2: one step covers 4 micro-batches, the last window of 10 only 2.
        let mut j = job(&["--gradient_accumulation_steps", "2"]);
        j.training.max_steps = -1;
        j.training.num_train_epochs = Some(1.0);
        let p = Plan::new(&j, 10, 2).unwrap();
        assert_eq!((p.gradient_accumulation_steps, p.world_size), (4, 2));
        assert_eq!(p.steps_per_epoch, 3);
        assert_eq!((p.window_len(0), p.window_len(8)), (4, 2));
    }
}
