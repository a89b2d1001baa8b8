//! A training job end to end: pick the checkpoint to resume from, load the model and data, build
//! the backend, train, then write the final artefacts. Cancel (SIGINT) and termination
//! (SIGTERM) end the process by the same signal once nothing partial is left (DESIGN.md §5).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use super::plan::Plan;
use super::report::Reporter;
use super::state::{log_history_of, trainer_state_json, ResumeState, RunState};
use super::trainer::{Outcome, Trainer};
use crate::checkpoint::{self, atomic, tensors};
use crate::cli::UsageError;
use crate::data::{PluginRows, PreparedData};
use crate::engine::select::Resolved;
use crate::engine::Backend;
use crate::job::JobConfig;
use crate::model::config::ModelConfig;
use crate::plugin::{FormatterPlugin, PluginLimits, PluginRuntime};

/// What a finished job produced.
#[derive(Debug, Clone)]
pub struct JobReport {
    pub state: RunState,
    pub resumed_from: Option<PathBuf>,
    /// Files `--save_model`/`--save_gguf` wrote.
    pub saved: Vec<PathBuf>,
    /// False when the run paused before its last step.
    pub completed: bool,
}

/// Options a caller inside ferrotune (the demo) adds to a job's flags.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Stop after this global step with a checkpoint (see [`Trainer::pause_after`]).
    pub pause_after: Option<u64>,
}

/// Past the model's window unsloth-cli.py stretches RoPE for every sample
/// ([`ModelConfig::unsloth_rope_stretch`]); so do both engines and the exports. Said once, as
/// Unsloth does.
fn announce_rope_stretch(job: &JobConfig, model_dir: &Path) -> Result<()> {
    let cfg = ModelConfig::from_dir(model_dir)?;
    let max_seq_length = job.model.max_seq_length;
    if let Some(factor) = cfg.unsloth_rope_stretch(max_seq_length) {
        tracing::warn!(
            "{} handles at most {} tokens (max_position_embeddings); as unsloth-cli.py does, \
             RoPE is stretched linearly by {factor:.3} to --max_seq_length {max_seq_length}, for \
             every sample, and the merged model and GGUF files carry the stretch",
            job.model.model_name,
            cfg.max_position_embeddings
        );
    }
    Ok(())
}

/// Runs the job; returns when it completed or paused (a stop signal ends the process).
pub fn run_job(job: &JobConfig) -> Result<JobReport> {
    run_job_with(job, RunOptions::default())
}

pub fn run_job_with(job: &JobConfig, options: RunOptions) -> Result<JobReport> {
    let stop = crate::signals::install().context("installing the SIGINT/SIGTERM handlers")?;
    let out = &job.saving.output_dir;
    std::fs::create_dir_all(out)
        .with_context(|| format!("--output_dir {}: cannot create", out.display()))?;
    for leftover in atomic::clean_leftovers(out)? {
        tracing::info!(
            "removed {} (left by an interrupted save)",
            leftover.display()
        );
    }
    // --sync: fetch the newest valid remote checkpoint before choosing one to resume from.
    let sync = crate::sync::from_job(job)?;
    sync.before_start(&crate::sync::SyncStart::of(job))?;
    let resume_from = resume_source(job)?;

    let device = crate::engine::select::resolve(job.model.device)?;
    let world = crate::engine::select::world_size(&device, job.model.num_gpus)?;
    let model_dir = crate::model::resolve::resolve_model(&job.model.model_name)?;
    announce_rope_stretch(job, &model_dir)?;
    let data = prepare_data(job, &model_dir)?;
    let train = data.train_batcher(job)?;
    let eval = data.eval_batcher(job)?;
    let plan = Plan::new(job, train.batches_per_epoch(), world).map_err(UsageError::new)?;
    let mut backend = build_backend(&device, &model_dir, job, world)?;
    tracing::info!(
        backend = backend.name(),
        steps = plan.total_steps,
        steps_per_epoch = plan.steps_per_epoch,
        micro_batches_per_epoch = plan.micro_batches_per_epoch,
        warmup_steps = plan.schedule.warmup_steps,
        "training plan"
    );

    let mut state = match &resume_from {
        Some(dir) => restore(backend.as_mut(), dir, job, &data.fingerprint)?,
        None => RunState::fresh(),
    };
    let trainer = Trainer {
        job,
        plan,
        train: &train,
        eval: eval.as_ref(),
        stop,
        fingerprint: data.fingerprint.clone(),
        pause_after: options.pause_after,
        sync: sync.as_ref(),
    };
    if state.global_step >= trainer.plan.total_steps {
        tracing::info!(
            "the checkpoint is at step {} of {}: nothing left to train",
            state.global_step,
            trainer.plan.total_steps
        );
    }
    let mut reporter = Reporter::new(job, state.global_step, trainer.plan.total_steps)?;
    let outcome = trainer.run(backend.as_mut(), &mut state, &mut reporter)?;
    reporter.finish()?;
    match outcome {
        Outcome::Stopped(signal) => {
            sync.on_stopped(signal);
            crate::signals::die_by(signal)
        }
        Outcome::Paused => {
            return Ok(JobReport {
                state,
                resumed_from: resume_from,
                saved: Vec::new(),
                completed: false,
            })
        }
        Outcome::Completed => {}
    }
    finish_state(&trainer, &mut state)?;
    let saved = final_exports(&trainer, backend.as_ref(), &state, &model_dir)?;
    sync.on_run_finished(&job.saving.save_path)?;
    Ok(JobReport {
        state,
        resumed_from: resume_from,
        saved,
        completed: true,
    })
}

/// `--resume_from_checkpoint DIR` (must be valid) or `--resume` (newest valid, else fresh).
fn resume_source(job: &JobConfig) -> Result<Option<PathBuf>> {
    let c = &job.checkpoint;
    if let Some(dir) = &c.resume_from_checkpoint {
        checkpoint::verify(dir).map_err(|why| {
            UsageError::new(format!(
                "--resume_from_checkpoint {}: not a valid checkpoint ({why:#}); pass another \
                 checkpoint-N or use --resume to pick the newest valid one",
                dir.display()
            ))
        })?;
        return Ok(Some(dir.clone()));
    }
    if !c.resume {
        return Ok(None);
    }
    let found = checkpoint::newest_valid(&job.saving.output_dir)?;
    match &found {
        Some(dir) => tracing::info!("--resume: continuing from {}", dir.display()),
        None => tracing::info!(
            "--resume: no valid checkpoint in {}; starting fresh",
            job.saving.output_dir.display()
        ),
    }
    Ok(found)
}

fn prepare_data(job: &JobConfig, model_dir: &Path) -> Result<PreparedData> {
    let runtime = PluginRuntime::new(PluginLimits {
        memory_mb: job.plugins.plugin_memory_mb,
        timeout: Duration::from_secs_f64(job.plugins.plugin_timeout_s),
    })?;
    let config = match &job.plugins.formatter_config {
        Some(text) => crate::job::json_or_file("--formatter_config", text)?,
        None => serde_json::Value::Null,
    };
    let plugin = FormatterPlugin::load(&runtime, &job.plugins.formatter, config)?;
    let rows = PluginRows {
        plugin: &plugin,
        on_bad_row: job.plugins.on_bad_row,
    };
    crate::data::prepare(job, model_dir, &rows)
}

fn build_backend(
    device: &Resolved,
    model_dir: &Path,
    job: &JobConfig,
    world: usize,
) -> Result<Box<dyn Backend>> {
    match device {
        Resolved::Cpu => {
            debug_assert_eq!(world, 1, "select::world_size gives 1 on the cpu");
            let mut model = crate::model::Model::load(model_dir)?;
            model.config = model.config.for_max_seq_length(job.model.max_seq_length);
            Ok(Box::new(crate::engine::cpu::CpuBackend::from_job(
                model, job,
            )?))
        }
        #[cfg(feature = "cuda")]
        Resolved::Cuda(name) if world > 1 => {
            tracing::info!("training on {world} GPUs, data parallel ({name} first)");
            let (dir, job) = (model_dir.to_path_buf(), job.clone());
            Ok(Box::new(crate::engine::cuda::replica::data_parallel(
                world,
                move |rank| crate::engine::cuda::CudaBackend::from_job_on(rank, &dir, &job),
            )?))
        }
        #[cfg(feature = "cuda")]
        Resolved::Cuda(name) => {
            tracing::info!("training on {name}");
            Ok(Box::new(crate::engine::cuda::CudaBackend::from_job(
                model_dir, job,
            )?))
        }
        #[cfg(not(feature = "cuda"))]
        Resolved::Cuda(_) => unreachable!("select::resolve gives cuda only in cuda builds"),
    }
}

/// Loads a checkpoint into the backend and returns the run state it saved.
pub fn restore(
    backend: &mut dyn Backend,
    dir: &Path,
    job: &JobConfig,
    fingerprint: &str,
) -> Result<RunState> {
    let loaded = checkpoint::load(dir)?;
    let resume = ResumeState::from_json(&loaded.training_state)
        .with_context(|| format!("{}", dir.display()))?;
    resume
        .check_same_run(job, fingerprint, backend.world_size())
        .with_context(|| format!("resuming from {}", dir.display()))?;
    let wanted: Vec<(String, Vec<usize>)> = backend
        .export_trainable()?
        .into_iter()
        .map(|(name, t)| (name, t.shape))
        .collect();
    let params = tensors::align(loaded.adapter, &wanted, &format!("{}", dir.display()))?;
    backend.import_trainable(&params)?;
    backend
        .import_optimizer(&loaded.optimizer_tensors, &loaded.optimizer_scalars)
        .with_context(|| format!("{}: optimizer state", dir.display()))?;
    let history = log_history_of(&loaded.trainer_state)?;
    tracing::info!(
        "resumed from {} at step {} (epoch {}, micro-batch {})",
        dir.display(),
        resume.global_step,
        resume.data_position.epoch,
        resume.data_position.index
    );
    Ok(resume.into_run_state(history))
}

/// Appends transformers' end-of-training summary to the log and writes
/// `OUTPUT_DIR/trainer_state.json` (what `trainer.save_state()` writes).
fn finish_state(trainer: &Trainer, state: &mut RunState) -> Result<()> {
    let plan = &trainer.plan;
    let losses = state.logged_losses();
    let train_loss = if losses.is_empty() {
        f64::NAN
    } else {
        losses.iter().map(|l| l.1).sum::<f64>() / losses.len() as f64
    };
    let runtime = state.train_runtime_s.max(1e-9);
    let already = state
        .log_history
        .last()
        .is_some_and(|e| e.get("train_runtime").is_some() && e["step"] == state.global_step);
    if !already {
        state.log_history.push(serde_json::json!({
            "epoch": state.epoch(plan),
            "step": state.global_step,
            "train_loss": train_loss,
            "train_runtime": state.train_runtime_s,
            "train_steps_per_second": state.global_step as f64 / runtime,
            "train_tokens_per_second": state.tokens_seen as f64 / runtime,
            "total_flos": 0.0,
        }));
    }
    let json = trainer_state_json(state, plan, trainer.job);
    atomic::replace_file(
        &trainer
            .job
            .saving
            .output_dir
            .join(checkpoint::TRAINER_STATE),
        &serde_json::to_vec_pretty(&json)?,
    )
}

/// `--save_model`/`--save_gguf`: the final adapter goes to a scratch directory, then the export
/// module writes what was asked into `--save_path`.
fn final_exports(
    trainer: &Trainer,
    backend: &dyn Backend,
    state: &RunState,
    model_dir: &Path,
) -> Result<Vec<PathBuf>> {
    let s = &trainer.job.saving;
    if !s.save_model && !s.save_gguf {
        return Ok(Vec::new());
    }
    let params = backend.export_trainable()?;
    let summary = trainer.summary(state, &params);
    let scratch = tempfile::tempdir().context("creating a scratch directory for the adapter")?;
    crate::export::adapter::write_dir(scratch.path(), trainer.job, &params, &summary)?;
    let written = crate::export::run_final_exports(trainer.job, model_dir, scratch.path())?;
    for file in &written {
        tracing::info!("saved {}", file.display());
    }
    Ok(written)
}
