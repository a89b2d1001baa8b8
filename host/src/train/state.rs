//! What a run knows about its own progress, and its two JSON forms in a checkpoint:
//! `trainer_state.json` (transformers' `TrainerState`, for people and tools that read HF
//! checkpoints) and `training_state.json` (what exact continuation needs).

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::plan::Plan;
use crate::data::{identity, DataPosition};
use crate::job::JobConfig;
use crate::optim::schedule::Schedule;

const FORMAT_VERSION: u32 = 1;

/// Loss accumulated since the last log line (transformers logs the mean over those steps).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PendingLog {
    pub loss_sum: f64,
    pub steps: u64,
}

/// Progress of a run; everything here is saved and restored.
#[derive(Debug, Clone, PartialEq)]
pub struct RunState {
    pub global_step: u64,
    /// The next micro-batch to train on.
    pub position: DataPosition,
    /// transformers' `log_history` entries.
    pub log_history: Vec<Value>,
    /// Input tokens (padding included) processed so far.
    pub tokens_seen: u64,
    pub pending: PendingLog,
    /// Seconds spent training, summed over the processes of this run.
    pub train_runtime_s: f64,
}

impl RunState {
    pub fn fresh() -> Self {
        Self {
            global_step: 0,
            position: DataPosition::default(),
            log_history: Vec::new(),
            tokens_seen: 0,
            pending: PendingLog::default(),
            train_runtime_s: 0.0,
        }
    }

    /// Epochs done, as a fraction.
    pub fn epoch(&self, plan: &Plan) -> f64 {
        self.position.epoch_progress(plan.micro_batches_per_epoch)
    }

    /// Training loss of each logged step, in order (what exact-resume checks compare).
    pub fn logged_losses(&self) -> Vec<(u64, f64)> {
        self.log_history
            .iter()
            .filter_map(|e| Some((e.get("step")?.as_u64()?, e.get("loss")?.as_f64()?)))
            .collect()
    }
}

/// `training_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResumeState {
    pub format_version: u32,
    pub global_step: u64,
    pub data_position: DataPosition,
    pub tokens_seen: u64,
    pub pending_log: PendingLog,
    pub train_runtime_s: f64,
    /// The schedule as planned when saved (a resume with another --max_steps replans it).
    pub schedule: Schedule,
    /// Run identity: a resume with different values would not continue the same run.
    pub seed: u64,
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// Data-parallel ranks of the run that saved it (absent before multi-GPU: 1). A resume
    /// may change the rank count as long as `GA × ranks` (the micro-batches per step) stays.
    #[serde(default = "one")]
    pub world_size: usize,
    pub data_fingerprint: String,
    /// The flags the data was made from (`crate::data::identity`), to name what changed when
    /// the fingerprint does not match (absent in older checkpoints).
    #[serde(default)]
    pub data_settings: BTreeMap<String, String>,
}

fn one() -> usize {
    1
}

impl ResumeState {
    pub fn capture(state: &RunState, plan: &Plan, job: &JobConfig, fingerprint: &str) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            global_step: state.global_step,
            data_position: state.position,
            tokens_seen: state.tokens_seen,
            pending_log: state.pending,
            train_runtime_s: state.train_runtime_s,
            schedule: plan.schedule.clone(),
            seed: job.training.seed,
            per_device_train_batch_size: job.training.per_device_train_batch_size,
            gradient_accumulation_steps: job.training.gradient_accumulation_steps,
            world_size: plan.world_size,
            data_fingerprint: fingerprint.to_string(),
            data_settings: identity::data_settings(job),
        }
    }

    pub fn from_json(value: &Value) -> Result<Self> {
        let state: Self = serde_json::from_value(value.clone())
            .context("training_state.json does not have the expected fields")?;
        if state.format_version != FORMAT_VERSION {
            bail!(
                "training_state.json has format version {}, this ferrotune reads {FORMAT_VERSION}",
                state.format_version
            );
        }
        Ok(state)
    }

    /// Refuses to continue a run whose data stream would differ from the saved one.
    pub fn check_same_run(
        &self,
        job: &JobConfig,
        fingerprint: &str,
        world_size: usize,
    ) -> Result<()> {
        let t = &job.training;
        let mut diffs = Vec::new();
        if self.seed != t.seed {
            diffs.push(format!("--seed {} (checkpoint: {})", t.seed, self.seed));
        }
        if self.per_device_train_batch_size != t.per_device_train_batch_size {
            diffs.push(format!(
                "--per_device_train_batch_size {} (checkpoint: {})",
                t.per_device_train_batch_size, self.per_device_train_batch_size
            ));
        }
        // Micro-batches per optimizer step: the same with 2 GPUs × GA 2 as with 1 GPU × GA 4.
        let window = |ga: usize, world: usize| ga.max(1) * world.max(1);
        if window(self.gradient_accumulation_steps, self.world_size)
            != window(t.gradient_accumulation_steps, world_size)
        {
            diffs.push(if self.world_size == world_size {
                format!(
                    "--gradient_accumulation_steps {} (checkpoint: {})",
                    t.gradient_accumulation_steps, self.gradient_accumulation_steps
                )
            } else {
                format!(
                    "--gradient_accumulation_steps {} × {world_size} GPUs (checkpoint: {} × {} \
                     GPUs; keep the product the same)",
                    t.gradient_accumulation_steps,
                    self.gradient_accumulation_steps,
                    self.world_size
                )
            });
        }
        if self.data_fingerprint != fingerprint {
            let now = identity::data_settings(job);
            diffs.push(identity::describe_change(&self.data_settings, &now));
        }
        if !diffs.is_empty() {
            bail!(
                "this run cannot continue the checkpoint exactly: {}; resume with the checkpoint's \
                 settings or start a new --output_dir",
                diffs.join("; ")
            );
        }
        Ok(())
    }

    pub fn into_run_state(self, log_history: Vec<Value>) -> RunState {
        RunState {
            global_step: self.global_step,
            position: self.data_position,
            log_history,
            tokens_seen: self.tokens_seen,
            pending: self.pending_log,
            train_runtime_s: self.train_runtime_s,
        }
    }
}

/// transformers' `TrainerState` as `trainer_state.json` holds it.
pub fn trainer_state_json(state: &RunState, plan: &Plan, job: &JobConfig) -> Value {
    let c = &job.checkpoint;
    json!({
        "best_global_step": null,
        "best_metric": null,
        "best_model_checkpoint": null,
        "epoch": state.epoch(plan),
        "eval_steps": job.reporting.logging_steps,
        "global_step": state.global_step,
        "is_hyper_param_search": false,
        "is_local_process_zero": true,
        "is_world_process_zero": true,
        "log_history": state.log_history,
        "logging_steps": job.reporting.logging_steps,
        "max_steps": plan.total_steps,
        "num_input_tokens_seen": state.tokens_seen,
        "num_train_epochs": plan.num_train_epochs,
        "save_steps": c.save_steps,
        "stateful_callbacks": {},
        "total_flos": 0.0,
        "train_batch_size": job.training.per_device_train_batch_size,
        "trial_name": null,
        "trial_params": null,
    })
}

/// `log_history` from a saved `trainer_state.json`.
pub fn log_history_of(trainer_state: &Value) -> Result<Vec<Value>> {
    trainer_state
        .get("log_history")
        .and_then(|v| v.as_array())
        .cloned()
        .context("trainer_state.json has no log_history")
}
