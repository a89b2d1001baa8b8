//! The training loop, independent of the backend: accumulation windows, loss normalisation,
//! clipping, the schedule, logging, evaluation and checkpoint cadence.

use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::json;

use super::plan::Plan;
use super::report::{Reporter, TrainMetrics};
use super::state::{ResumeState, RunState};
use crate::checkpoint::{self, Snapshot};
use crate::cli::choices::SaveStrategy;
use crate::data::{Batcher, PositionedBatch};
use crate::engine::Backend;
use crate::export::adapter;
use crate::job::JobConfig;
use crate::signals::{StopFlag, StopSignal};

/// How a call to [`Trainer::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every planned step ran.
    Completed,
    /// A signal asked the run to stop; the state is that of the last completed step.
    Stopped(StopSignal),
    /// `pause_after` was reached; a checkpoint of that step exists (when saving is on).
    Paused,
}

/// One step's measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean loss per trainable token over the whole accumulation window.
    pub loss: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    pub learning_rate: f64,
    /// Input tokens processed (padding included).
    pub tokens: u64,
}

pub struct Trainer<'a> {
    pub job: &'a JobConfig,
    pub plan: Plan,
    pub train: &'a Batcher<'a>,
    pub eval: Option<&'a Batcher<'a>>,
    pub stop: StopFlag,
    /// The data's fingerprint, stored in checkpoints.
    pub fingerprint: String,
    /// `--sync`: told about every checkpoint once it is complete (uploads run in the background).
    pub sync: &'a dyn crate::sync::SyncHooks,
    /// End this process's share of the run after this global step, with a checkpoint, as a
    /// preemption would (the demo shows a resume this way).
    pub pause_after: Option<u64>,
}

/// `torch.nn.utils.clip_grad_norm_`'s factor: `max_norm / (norm + 1e-6)`, capped at 1; 0 disables.
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 || !norm.is_finite() {
        return 1.0;
    }
    (max_norm / (norm + 1e-6)).min(1.0)
}

impl Trainer<'_> {
    /// Trains from `state` until the plan's last step or a stop signal.
    pub fn run(
        &self,
        backend: &mut dyn Backend,
        state: &mut RunState,
        reporter: &mut Reporter,
    ) -> Result<Outcome> {
        let plan = &self.plan;
        let mut batches = self.train.batches_from(state.position)?;
        let process_start = Instant::now();
        let runtime_base = state.train_runtime_s;
        let mut last_log = (Instant::now(), 0u64);
        let mut last_saved = None;
        while state.global_step < plan.total_steps {
            if let Some(signal) = self.stop.requested() {
                return self.stop_now(signal, backend, state, last_saved);
            }
            // One window: GA micro-batches, fewer at the end of an epoch.
            let first = batches.next().expect("the batch stream is endless");
            let len = plan.window_len(first.at.index);
            let mut window = vec![first];
            window.extend(batches.by_ref().take(len - 1));
            let Some(stats) = self.step(backend, state.global_step, &window)? else {
                let signal = self
                    .stop
                    .requested()
                    .expect("a step is abandoned only on a stop");
                return self.stop_now(signal, backend, state, last_saved);
            };
            state.global_step += 1;
            state.position = window.last().expect("non-empty window").next;
            state.tokens_seen += stats.tokens;
            state.pending.loss_sum += stats.loss;
            state.pending.steps += 1;
            state.train_runtime_s = runtime_base + process_start.elapsed().as_secs_f64();
            last_log.1 += stats.tokens;
            reporter.step_done(state.global_step);

            let step = state.global_step;
            let last = step == plan.total_steps;
            if step.is_multiple_of(self.job.reporting.logging_steps as u64) || last {
                let elapsed = last_log.0.elapsed().as_secs_f64();
                self.log(
                    state,
                    &stats,
                    last_log.1 as f64 / elapsed.max(1e-9),
                    reporter,
                )?;
                last_log = (Instant::now(), 0);
                if let Some(eval) = self.eval {
                    let loss = evaluate(backend, eval)?;
                    let epoch = state.epoch(plan);
                    state
                        .log_history
                        .push(json!({"eval_loss": loss, "epoch": epoch, "step": step}));
                    reporter.eval(step, loss, epoch)?;
                }
            }
            let epoch_end = state.position.index == 0;
            let due = match self.job.checkpoint.save_strategy {
                SaveStrategy::No => false,
                SaveStrategy::Steps => {
                    step.is_multiple_of(self.job.checkpoint.save_steps as u64) || last
                }
                SaveStrategy::Epoch => epoch_end || last,
            };
            let pausing = self.pause_after == Some(step) && !last;
            let saving_on = self.job.checkpoint.save_strategy != SaveStrategy::No;
            if due || (pausing && saving_on) {
                self.save(backend, state, reporter)?;
                last_saved = Some(step);
            }
            if pausing {
                return Ok(Outcome::Paused);
            }
        }
        Ok(Outcome::Completed)
    }

    /// Forward/backward over a window and one optimizer step; `None` when a stop signal
    /// arrived mid-window (the step is abandoned, nothing was applied).
    fn step(
        &self,
        backend: &mut dyn Backend,
        step: u64,
        window: &[PositionedBatch],
    ) -> Result<Option<StepStats>> {
        // The loss is a mean over every trainable token of the window, not a mean of
        // per-micro-batch means, so accumulation equals one big batch.
        // With data parallelism the backend spreads the window over its ranks; the scale is
        // still 1 / (trainable tokens of the whole window), so summed gradients are exact.
        let trainable: usize = window.iter().map(|b| b.batch.trainable_tokens()).sum();
        let loss_scale = 1.0 / trainable.max(1) as f32;
        let batches: Vec<&crate::engine::Batch> = window.iter().map(|b| &b.batch).collect();
        let stop = || self.stop.requested().is_some();
        let Some(pass) = backend.forward_backward_window(&batches, loss_scale, &stop)? else {
            return Ok(None);
        };
        let tokens: u64 = window
            .iter()
            .map(|b| (b.batch.batch_size * b.batch.seq_len) as u64)
            .sum();
        let loss = pass.loss_sum / trainable.max(1) as f64;
        if !loss.is_finite() {
            bail!(
                "the training loss became {loss} at step {}; lower --learning_rate or check the data",
                step + 1
            );
        }
        let grad_norm = backend.grad_norm()?;
        let learning_rate = self.plan.schedule.lr(step);
        backend.optimizer_step(
            learning_rate,
            clip_scale(grad_norm, self.job.training.max_grad_norm),
        )?;
        Ok(Some(StepStats {
            loss,
            grad_norm,
            learning_rate,
            tokens,
        }))
    }

    fn log(
        &self,
        state: &mut RunState,
        stats: &StepStats,
        tokens_per_second: f64,
        reporter: &mut Reporter,
    ) -> Result<()> {
        let loss = state.pending.loss_sum / state.pending.steps.max(1) as f64;
        state.pending = Default::default();
        let epoch = state.epoch(&self.plan);
        state.log_history.push(json!({
            "loss": loss,
            "grad_norm": stats.grad_norm,
            "learning_rate": stats.learning_rate,
            "epoch": epoch,
            "step": state.global_step,
        }));
        reporter.train(&TrainMetrics {
            step: state.global_step,
            total_steps: self.plan.total_steps,
            loss,
            learning_rate: stats.learning_rate,
            grad_norm: stats.grad_norm,
            epoch,
            tokens_per_second,
            eta_seconds: reporter.eta(state.global_step, self.plan.total_steps),
        })
    }

    /// Cancel (SIGINT) stops without writing anything; termination (SIGTERM) first saves the
    /// last completed step when it is not saved yet, since the node is going away.
    fn stop_now(
        &self,
        signal: StopSignal,
        backend: &mut dyn Backend,
        state: &RunState,
        last_saved: Option<u64>,
    ) -> Result<Outcome> {
        tracing::info!(
            "stop requested ({signal:?}) after step {}",
            state.global_step
        );
        let saving = self.job.checkpoint.save_strategy != SaveStrategy::No;
        if signal == StopSignal::Terminate
            && saving
            && state.global_step > 0
            && last_saved != Some(state.global_step)
        {
            let dir =
                checkpoint::save(&self.job.saving.output_dir, &self.snapshot(backend, state)?)?;
            tracing::info!("saved {} before stopping", dir.display());
            // The node is going away: sync gets a grace period to store it (job::run_job_with).
            self.sync.on_checkpoint_saved(&dir)?;
        }
        Ok(Outcome::Stopped(signal))
    }

    pub fn snapshot(&self, backend: &dyn Backend, state: &RunState) -> Result<Snapshot> {
        let adapter_params = backend.export_trainable()?;
        let (optimizer_tensors, optimizer_scalars) = backend.export_optimizer()?;
        let summary = self.summary(state, &adapter_params);
        Ok(Snapshot {
            global_step: state.global_step,
            adapter_config: adapter::config_bytes(self.job),
            model_card: adapter::model_card(self.job, &summary),
            adapter: adapter_params,
            optimizer_tensors,
            optimizer_scalars,
            trainer_state: super::state::trainer_state_json(state, &self.plan, self.job),
            training_state: serde_json::to_value(ResumeState::capture(
                state,
                &self.plan,
                self.job,
                &self.fingerprint,
            ))?,
            training_args: serde_json::to_value(self.job)?,
        })
    }

    pub fn summary(
        &self,
        state: &RunState,
        params: &[(String, crate::engine::HostTensor)],
    ) -> adapter::TrainingSummary {
        let losses = state.logged_losses();
        adapter::TrainingSummary {
            global_step: state.global_step,
            epoch: state.epoch(&self.plan),
            first_loss: losses.first().map(|l| l.1),
            last_loss: losses.last().map(|l| l.1),
            trainable_params: params
                .iter()
                .map(|(_, t)| t.shape.iter().product::<usize>())
                .sum(),
        }
    }

    fn save(&self, backend: &dyn Backend, state: &RunState, reporter: &Reporter) -> Result<()> {
        let out = &self.job.saving.output_dir;
        let dir = checkpoint::save(out, &self.snapshot(backend, state)?)?;
        reporter.info(&format!("saved {}", dir.display()));
        if let Some(limit) = self.job.checkpoint.save_total_limit {
            for old in checkpoint::rotate(out, limit, &dir)? {
                reporter.info(&format!(
                    "deleted {} (--save_total_limit {limit})",
                    old.display()
                ));
            }
        }
        self.sync.on_checkpoint_saved(&dir)?;
        Ok(())
    }
}

/// Mean loss per trainable token over the whole evaluation set.
pub fn evaluate(backend: &mut dyn Backend, eval: &Batcher) -> Result<f64> {
    let (mut loss_sum, mut tokens) = (0.0, 0usize);
    for batch in eval.one_epoch() {
        let pass = backend.eval_loss(&batch)?;
        loss_sum += pass.loss_sum;
        tokens += pass.tokens;
    }
    Ok(loss_sum / tokens.max(1) as f64)
}
