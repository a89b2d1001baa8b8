//! ferrotune's own syncing of checkpoints and final artefacts to storage, with Kelpie's
//! semantics, so a job survives vanishing nodes on any queue or none:
//!
//! - before training (`--resume`): download the newest remote checkpoint whose manifest
//!   verifies into `--output_dir` (incomplete or corrupt uploads are skipped);
//! - after each checkpoint: upload its files, manifest last, and mirror `--save_total_limit`
//!   rotation remotely — in the background, retried through outages;
//! - at the end, only when the run completed: upload `--save_path` (each object re-checked),
//!   and wait for everything; what could not be stored makes the run fail.
//!
//! Flags: `--sync mirror` (the built-in policy) and `--sync_config '{"storage": URL, ...}'`
//! (see [`SyncSettings`]). The trainer drives it through [`SyncHooks`].

pub mod execute;
pub mod manifest;
pub mod policy;
pub mod worker;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;

use crate::cli::UsageError;
use crate::storage::{ObjectStore, StorageError};
use execute::Done;
use policy::{Event, Mirror, RunOutcome, SyncPolicy};
use worker::{Backoff, Batch, BatchKind, Worker};

/// The built-in sync policies.
pub const BUILTIN_POLICIES: [&str; 1] = ["mirror"];

/// `--sync_config` keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncSettings {
    /// Storage URL: `s3://bucket/prefix` or `file:///dir`; `{job_id}` becomes `KELPIE_JOB_ID`.
    pub storage: String,
    /// Key prefix of checkpoints under the storage URL.
    #[serde(default = "default_checkpoints_prefix")]
    pub checkpoints_prefix: String,
    /// Key prefix of the final artefacts (`--save_path`) under the storage URL.
    #[serde(default = "default_outputs_prefix")]
    pub outputs_prefix: String,
    /// How long the end of the run waits for pending uploads before failing, seconds.
    #[serde(default = "default_final_timeout_s")]
    pub final_timeout_s: f64,
}

fn default_checkpoints_prefix() -> String {
    "checkpoints".into()
}
fn default_outputs_prefix() -> String {
    "outputs".into()
}
fn default_final_timeout_s() -> f64 {
    900.0
}

impl SyncSettings {
    /// Validates `--sync` / `--sync_config` together; `None` when sync is off.
    pub fn from_flags(
        sync: Option<&str>,
        sync_config: Option<&str>,
    ) -> Result<Option<Self>, UsageError> {
        let Some(policy) = sync else {
            if sync_config.is_some() {
                return Err(UsageError::new(
                    "--sync_config is set but --sync is not; add --sync mirror",
                ));
            }
            return Ok(None);
        };
        if !BUILTIN_POLICIES.contains(&policy) {
            let hint = if policy.ends_with(".wasm") {
                "sync policies as .wasm plugins need the sync plugin runtime, not in this build; \
                 use --sync mirror"
            } else {
                "use --sync mirror"
            };
            return Err(UsageError::new(format!(
                "--sync {policy:?}: unknown policy; {hint}"
            )));
        }
        let text = sync_config.ok_or_else(|| {
            UsageError::new(
                "--sync needs --sync_config with the storage URL, e.g. \
                 --sync_config '{\"storage\": \"s3://bucket/jobs/{job_id}\"}'",
            )
        })?;
        let value = crate::job::json_or_file("--sync_config", text)?;
        let settings: SyncSettings = serde_json::from_value(value).map_err(|e| {
            UsageError::new(format!(
                "--sync_config: {e}; keys: storage (required), checkpoints_prefix, \
                 outputs_prefix, final_timeout_s"
            ))
        })?;
        crate::storage::StorageUrl::parse(&settings.storage)
            .map_err(|e| UsageError::new(format!("--sync_config storage: {e}")))?;
        for (name, prefix) in [
            ("checkpoints_prefix", &settings.checkpoints_prefix),
            ("outputs_prefix", &settings.outputs_prefix),
        ] {
            crate::storage::key::check(prefix)
                .map_err(|e| UsageError::new(format!("--sync_config {name}: {e}")))?;
        }
        if settings.checkpoints_prefix == settings.outputs_prefix {
            return Err(UsageError::new(
                "--sync_config: checkpoints_prefix and outputs_prefix must differ",
            ));
        }
        if !(settings.final_timeout_s.is_finite() && settings.final_timeout_s >= 0.0) {
            return Err(UsageError::new(
                "--sync_config final_timeout_s must be a number of seconds >= 0",
            ));
        }
        Ok(Some(settings))
    }
}

/// The three moments the trainer tells sync about. Methods take `&self` so the trainer can hold
/// a shared reference next to its other borrowed state.
pub trait SyncHooks {
    /// Before training starts; with `resume`, fetches the newest valid remote checkpoint into
    /// `output_dir`. Returns the step it fetched, if any. Blocking.
    fn before_start(&self, output_dir: &Path, resume: bool) -> anyhow::Result<Option<u64>>;
    /// `dir` is a complete `checkpoint-N` directory (manifest written). Never blocks on storage.
    fn on_checkpoint_saved(&self, dir: &Path) -> anyhow::Result<()>;
    /// The run ended. With `Completed`, uploads `save_path` and waits for every pending upload;
    /// fails when the newest checkpoint or the final artefacts are not stored. Call once.
    fn on_run_finished(&self, outcome: RunOutcome, save_path: &Path) -> anyhow::Result<()>;
}

/// The job's sync: [`Syncer`] with `--sync`, else [`NoSync`]. Opening a store makes no request
/// yet; [`SyncHooks::before_start`] makes the first.
pub fn from_job(job: &crate::job::JobConfig) -> anyhow::Result<Box<dyn SyncHooks>> {
    let settings = SyncSettings::from_flags(
        job.plugins.sync.as_deref(),
        job.plugins.sync_config.as_deref(),
    )?;
    Ok(match settings {
        None => Box::new(NoSync),
        Some(settings) => Box::new(Syncer::open(&settings, job.checkpoint.save_total_limit)?),
    })
}

/// Sync switched off.
pub struct NoSync;

impl SyncHooks for NoSync {
    fn before_start(&self, _: &Path, _: bool) -> anyhow::Result<Option<u64>> {
        Ok(None)
    }
    fn on_checkpoint_saved(&self, _: &Path) -> anyhow::Result<()> {
        Ok(())
    }
    fn on_run_finished(&self, _: RunOutcome, _: &Path) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Knobs tests turn; production uses [`SyncOptions::default`].
#[derive(Debug, Clone, Copy)]
pub struct SyncOptions {
    pub backoff: Backoff,
    pub final_timeout: Duration,
    /// Attempts of the blocking start-up download before giving up.
    pub start_attempts: u32,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            backoff: Backoff {
                base: Duration::from_secs(1),
                cap: Duration::from_secs(60),
            },
            final_timeout: Duration::from_secs(900),
            start_attempts: 5,
        }
    }
}

/// Sync through a policy and a store.
pub struct Syncer {
    store: Arc<dyn ObjectStore>,
    policy: Mutex<Box<dyn SyncPolicy>>,
    options: SyncOptions,
    /// `None` once the run finished or was abandoned.
    worker: Mutex<Option<Worker>>,
}

impl Syncer {
    /// Opens the storage named by `settings` with the built-in `mirror` policy.
    pub fn open(settings: &SyncSettings, keep_last: Option<usize>) -> Result<Self, StorageError> {
        let store: Arc<dyn ObjectStore> = Arc::from(crate::storage::open(&settings.storage)?);
        let policy = Mirror {
            checkpoints_prefix: settings.checkpoints_prefix.clone(),
            outputs_prefix: settings.outputs_prefix.clone(),
            keep_last,
        };
        let options = SyncOptions {
            final_timeout: Duration::from_secs_f64(settings.final_timeout_s),
            ..SyncOptions::default()
        };
        Ok(Self::new(store, Box::new(policy), options))
    }

    pub fn new(
        store: Arc<dyn ObjectStore>,
        policy: Box<dyn SyncPolicy>,
        options: SyncOptions,
    ) -> Self {
        let worker = Worker::start(Arc::clone(&store), options.backoff);
        Syncer {
            store,
            policy: Mutex::new(policy),
            options,
            worker: Mutex::new(Some(worker)),
        }
    }

    /// Stops at once (SIGINT): pending uploads are dropped.
    pub fn abandon(&self) {
        if let Some(worker) = self.worker.lock().unwrap().take() {
            worker.abandon();
        }
    }

    fn decide(&self, event: &Event) -> anyhow::Result<Vec<policy::Action>> {
        let mut policy = self.policy.lock().unwrap();
        policy
            .on_event(event)
            .map_err(|e| anyhow::anyhow!("sync policy {}: {e}", policy.name()))
    }

    fn submit(&self, kind: BatchKind, dir: Option<&Path>, event: &Event) -> anyhow::Result<()> {
        let actions = self.decide(event)?;
        if let Some(worker) = self.worker.lock().unwrap().as_ref() {
            worker.submit(Batch {
                kind,
                dir: dir.map(Path::to_path_buf),
                actions,
            });
        }
        Ok(())
    }
}

impl Drop for Syncer {
    /// A job that ends by an error never calls `on_run_finished`: still store the checkpoints
    /// already queued (bounded by `final_timeout_s`), as a failed run's work is worth resuming.
    /// A job that ends by a signal never gets here (the process dies by the signal).
    fn drop(&mut self) {
        let Some(worker) = self.worker.get_mut().ok().and_then(Option::take) else {
            return;
        };
        if let Err(e) = worker.finish(self.options.final_timeout) {
            tracing::error!("sync to {} incomplete: {e}", self.store.url());
        }
    }
}

impl SyncHooks for Syncer {
    fn before_start(&self, output_dir: &Path, resume: bool) -> anyhow::Result<Option<u64>> {
        if !resume {
            // Still touch the store now, so bad settings fail before hours of training.
            self.store
                .list("")
                .map_err(|e| anyhow::anyhow!("sync: {e}"))?;
            return Ok(None);
        }
        let event = Event::ResumeRequested {
            output_dir: output_dir.to_path_buf(),
        };
        let actions = self.decide(&event)?;
        let mut fetched = None;
        for action in &actions {
            let mut attempt = 0;
            let done = loop {
                match execute::execute(&*self.store, action) {
                    Ok(done) => break done,
                    Err(err) if err.is_transient() && attempt + 1 < self.options.start_attempts => {
                        let delay = self.options.backoff.delay(attempt);
                        tracing::warn!(
                            "sync: resume download failed, retrying in {delay:?}: {err}"
                        );
                        std::thread::sleep(delay);
                        attempt += 1;
                    }
                    Err(err) => {
                        return Err(anyhow::anyhow!(
                            "sync: cannot fetch the newest checkpoint from {}: {err}",
                            self.store.url()
                        ))
                    }
                }
            };
            match done {
                Done::Downloaded { step } => {
                    tracing::info!(
                        storage = self.store.url(),
                        step,
                        "resumable checkpoint downloaded"
                    );
                    fetched = Some(step);
                }
                Done::NothingNewer => {
                    tracing::info!(storage = self.store.url(), "no newer remote checkpoint")
                }
                _ => {}
            }
        }
        Ok(fetched)
    }

    fn on_checkpoint_saved(&self, dir: &Path) -> anyhow::Result<()> {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let step = manifest::checkpoint_step(name).ok_or_else(|| {
            anyhow::anyhow!("sync: {} is not a checkpoint-N directory", dir.display())
        })?;
        let files = manifest::files_under(dir)
            .map_err(|e| anyhow::anyhow!("sync: cannot list {}: {e}", dir.display()))?;
        let event = Event::CheckpointSaved {
            step,
            dir: dir.to_path_buf(),
            files,
        };
        self.submit(BatchKind::Checkpoint(step), Some(dir), &event)
    }

    fn on_run_finished(&self, outcome: RunOutcome, save_path: &Path) -> anyhow::Result<()> {
        let files = if outcome == RunOutcome::Completed && save_path.exists() {
            if save_path.is_file() {
                return Err(anyhow::anyhow!(
                    "sync: --save_path {} is a file; it must be a directory",
                    save_path.display()
                ));
            }
            manifest::files_under(save_path)
                .map_err(|e| anyhow::anyhow!("sync: cannot list {}: {e}", save_path.display()))?
        } else {
            Vec::new()
        };
        let event = Event::RunFinished {
            outcome,
            save_path: PathBuf::from(save_path),
            files,
        };
        self.submit(BatchKind::Final, None, &event)?;
        let worker = self
            .worker
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| anyhow::anyhow!("sync: the run already finished"))?;
        let started = std::time::Instant::now();
        worker
            .finish(self.options.final_timeout)
            .map_err(|e| anyhow::anyhow!("sync to {} incomplete: {e}", self.store.url()))?;
        tracing::info!(
            storage = self.store.url(),
            secs = started.elapsed().as_secs(),
            "sync complete"
        );
        Ok(())
    }
}
