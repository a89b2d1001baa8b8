//! ferrotune's own syncing of checkpoints and final artefacts to storage, with Kelpie's
//! semantics, so a job survives vanishing nodes on any queue or none.
//!
//! A *policy* decides and the host executes. The policy (built-in `mirror`, or a `.wasm` plugin
//! of the `sync` world: `--sync PATH.wasm`) hears four events — `run-starting` (with the resume
//! request), `checkpoint-saved` (with its files), `checkpoint-deleted` (local rotation) and
//! `run-finished` (with the final artefacts) — and answers with actions: upload, delete, delete a
//! checkpoint, keep the last N, download the newest valid checkpoint. [`Syncer`] checks every
//! action ([`policy::check_action`]) and runs it natively ([`execute`]): the resume download
//! blocking before training, everything else on a background [`worker`] that retries through
//! storage outages and never stalls training. At the end of a completed run it waits for every
//! upload; what could not be stored makes the run fail.
//!
//! Flags: `--sync mirror|PATH.wasm` and `--sync_config '{"storage": URL, ...}'` (see
//! [`SyncSettings`]). The trainer drives it through [`SyncHooks`].

pub mod events;
pub mod execute;
pub mod manifest;
pub mod policy;
pub mod worker;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;

use crate::cli::UsageError;
use crate::plugin::{PluginLimits, PluginRuntime};
use crate::signals::StopSignal;
use crate::storage::ObjectStore;
use execute::Done;
use policy::{Action, Event, Mirror, RunOutcome, RunStart, SyncPolicy};
use worker::{Backoff, Batch, BatchKind, Worker};

/// The built-in sync policies.
pub const BUILTIN_POLICIES: [&str; 1] = ["mirror"];

/// `--sync` and `--sync_config`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncSettings {
    pub policy: PolicySpec,
    /// Storage URL: `s3://bucket/prefix`, `file:///dir` or a storage plugin `PATH.wasm`
    /// (`--sync_to`, or `--sync_config` key `storage`); `{job_id}` becomes `KELPIE_JOB_ID`.
    pub storage: String,
    /// A storage plugin's config (`--sync_config` key `storage_config`: `allow_hosts`,
    /// `secrets`, the plugin's own keys). Holds secrets: never log it.
    pub storage_config: Option<serde_json::Value>,
    /// How long the end of the run waits for pending uploads before failing, seconds.
    pub final_timeout_s: f64,
    /// How long a run stopped by SIGTERM waits for pending uploads before dying, seconds.
    pub sigterm_grace_s: f64,
}

/// Which policy decides.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicySpec {
    /// The built-in `mirror`, with its `--sync_config` keys.
    Mirror {
        checkpoints_prefix: String,
        outputs_prefix: String,
    },
    /// A `.wasm` sync policy and its part of `--sync_config` (every key but the host's), as
    /// JSON text for its `configure`.
    Wasm { path: PathBuf, config: String },
}

/// The keys of `--sync_config` the host reads whatever the policy.
#[derive(Debug, Deserialize)]
struct HostKeys {
    storage: Option<String>,
    storage_config: Option<serde_json::Value>,
    #[serde(default = "default_final_timeout_s")]
    final_timeout_s: f64,
    #[serde(default = "default_sigterm_grace_s")]
    sigterm_grace_s: f64,
}

/// `mirror`'s own keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MirrorKeys {
    #[serde(default = "default_checkpoints_prefix")]
    checkpoints_prefix: String,
    #[serde(default = "default_outputs_prefix")]
    outputs_prefix: String,
}

const HOST_KEYS: [&str; 4] = [
    "storage",
    "storage_config",
    "final_timeout_s",
    "sigterm_grace_s",
];

fn default_checkpoints_prefix() -> String {
    "checkpoints".into()
}
fn default_outputs_prefix() -> String {
    "outputs".into()
}
fn default_final_timeout_s() -> f64 {
    900.0
}
/// Node shutdowns (SIGTERM, then SIGKILL) typically allow 30 s; leave some for the rest.
fn default_sigterm_grace_s() -> f64 {
    20.0
}

impl SyncSettings {
    /// Validates `--sync` / `--sync_to` / `--sync_config` together; `None` when sync is off.
    /// `--sync_to` alone means `--sync mirror`. A `.wasm` policy's own keys are checked by the
    /// policy when the job loads it.
    pub fn from_flags(
        sync: Option<&str>,
        sync_to: Option<&str>,
        sync_config: Option<&str>,
    ) -> Result<Option<Self>, UsageError> {
        let sync = sync.or(sync_to.map(|_| "mirror"));
        let Some(policy) = sync else {
            if sync_config.is_some() {
                return Err(UsageError::new(
                    "--sync_config is set but --sync is not; add --sync mirror",
                ));
            }
            return Ok(None);
        };
        let wasm = policy.ends_with(".wasm");
        if !wasm && !BUILTIN_POLICIES.contains(&policy) {
            return Err(UsageError::new(format!(
                "--sync {policy:?}: unknown policy; use --sync mirror or --sync PATH.wasm"
            )));
        }
        let value = match (sync_config, sync_to) {
            (Some(text), _) => crate::job::json_or_file("--sync_config", text)?,
            (None, Some(_)) => serde_json::Value::Object(Default::default()),
            (None, None) => {
                return Err(UsageError::new(
                    "--sync needs --sync_config with the storage URL (or --sync_to URL), e.g. \
                     --sync_config '{\"storage\": \"s3://bucket/jobs/{job_id}\"}'",
                ))
            }
        };
        let serde_json::Value::Object(mut keys) = value else {
            return Err(UsageError::new(
                "--sync_config must be a JSON object, e.g. {\"storage\": \"s3://bucket/prefix\"}",
            ));
        };
        let host_part: serde_json::Map<_, _> = HOST_KEYS
            .iter()
            .filter_map(|k| keys.remove(*k).map(|v| (k.to_string(), v)))
            .collect();
        let host: HostKeys = serde_json::from_value(host_part.into())
            .map_err(|e| UsageError::new(format!("--sync_config: {e}")))?;
        let storage = match (sync_to, host.storage) {
            (Some(to), Some(storage)) if to != storage => {
                return Err(UsageError::new(format!(
                    "--sync_to {to:?} and --sync_config storage {storage:?} name different \
                     storages; keep one"
                )))
            }
            (Some(to), _) => Some(to.to_string()),
            (None, storage) => storage,
        };
        let storage = storage.ok_or_else(|| {
            UsageError::new(
                "--sync_config: the storage URL is missing; add \"storage\": \"s3://bucket/prefix\" \
                 (or file:///dir)",
            )
        })?;
        let url = crate::storage::StorageUrl::parse(&storage)
            .map_err(|e| UsageError::new(format!("--sync_config storage: {e}")))?;
        check_storage_plugin(&url, host.storage_config.as_ref())?;
        for (name, secs) in [
            ("final_timeout_s", host.final_timeout_s),
            ("sigterm_grace_s", host.sigterm_grace_s),
        ] {
            if !(secs.is_finite() && secs >= 0.0) {
                return Err(UsageError::new(format!(
                    "--sync_config {name} must be a number of seconds >= 0"
                )));
            }
        }
        let policy = if wasm {
            let path = PathBuf::from(policy);
            std::fs::metadata(&path).map_err(|e| {
                UsageError::new(format!(
                    "--sync {policy}: cannot read it ({e}); pass mirror or a sync policy .wasm"
                ))
            })?;
            PolicySpec::Wasm {
                path,
                config: serde_json::Value::Object(keys).to_string(),
            }
        } else {
            let mirror: MirrorKeys = serde_json::from_value(keys.into()).map_err(|e| {
                UsageError::new(format!(
                    "--sync_config: {e}; keys: storage (required), checkpoints_prefix, \
                     outputs_prefix, final_timeout_s"
                ))
            })?;
            for (name, prefix) in [
                ("checkpoints_prefix", &mirror.checkpoints_prefix),
                ("outputs_prefix", &mirror.outputs_prefix),
            ] {
                crate::storage::key::check(prefix)
                    .map_err(|e| UsageError::new(format!("--sync_config {name}: {e}")))?;
            }
            if mirror.checkpoints_prefix == mirror.outputs_prefix {
                return Err(UsageError::new(
                    "--sync_config: checkpoints_prefix and outputs_prefix must differ",
                ));
            }
            PolicySpec::Mirror {
                checkpoints_prefix: mirror.checkpoints_prefix,
                outputs_prefix: mirror.outputs_prefix,
            }
        };
        Ok(Some(SyncSettings {
            policy,
            storage,
            storage_config: host.storage_config,
            final_timeout_s: host.final_timeout_s,
            sigterm_grace_s: host.sigterm_grace_s,
        }))
    }

    /// The policy these settings name, ready for events.
    pub fn build_policy(&self, limits: PluginLimits) -> anyhow::Result<Box<dyn SyncPolicy>> {
        Ok(match &self.policy {
            PolicySpec::Mirror {
                checkpoints_prefix,
                outputs_prefix,
            } => Box::new(Mirror::new(checkpoints_prefix, outputs_prefix)),
            PolicySpec::Wasm { path, config } => {
                let runtime = PluginRuntime::new(limits)?;
                Box::new(crate::plugin::sync_policy::WasmSyncPolicy::load(
                    &runtime, path, config,
                )?)
            }
        })
    }
}

/// A storage plugin must be readable and its `storage_config` valid; a native storage takes no
/// `storage_config` (it would be ignored).
fn check_storage_plugin(
    url: &crate::storage::StorageUrl,
    storage_config: Option<&serde_json::Value>,
) -> Result<(), UsageError> {
    let crate::storage::StorageUrl::Plugin { path } = url else {
        if storage_config.is_some() {
            return Err(UsageError::new(
                "--sync_config storage_config is only for storage plugins (--sync_to PATH.wasm); \
                 remove it",
            ));
        }
        return Ok(());
    };
    std::fs::metadata(path).map_err(|e| {
        UsageError::new(format!(
            "--sync_to {}: cannot read it ({e}); pass a storage URL or a storage plugin .wasm",
            path.display()
        ))
    })?;
    crate::plugin::storage_config::NetPluginConfig::parse(storage_config)
        .map_err(|e| UsageError::new(e.to_string()))?;
    Ok(())
}

/// What sync needs to know as the job starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncStart {
    pub output_dir: PathBuf,
    pub save_path: PathBuf,
    /// `--resume`.
    pub resume: bool,
    pub save_total_limit: Option<usize>,
}

impl SyncStart {
    pub fn of(job: &crate::job::JobConfig) -> Self {
        SyncStart {
            output_dir: job.saving.output_dir.clone(),
            save_path: job.saving.save_path.clone(),
            resume: job.checkpoint.resume,
            save_total_limit: job.checkpoint.save_total_limit,
        }
    }
}

/// The moments the trainer tells sync about. Methods take `&self` so the trainer can hold a
/// shared reference next to its other borrowed state.
pub trait SyncHooks {
    /// Call first, before training picks a checkpoint: tells the policy the run starts and, when
    /// it asks (`mirror` with `--resume`), fetches the newest valid remote checkpoint into
    /// `--output_dir`. Returns the step it fetched, if any. Blocking.
    fn before_start(&self, start: &SyncStart) -> anyhow::Result<Option<u64>>;
    /// `dir` is a complete `checkpoint-N` directory (manifest written), and any rotation of
    /// older ones is done. Never blocks on storage.
    fn on_checkpoint_saved(&self, dir: &Path) -> anyhow::Result<()>;
    /// The run completed and its final artefacts are in `save_path`: hands them to the policy
    /// and waits for every pending upload; fails when the newest checkpoint or the final
    /// artefacts are not stored. Call once.
    fn on_run_finished(&self, save_path: &Path) -> anyhow::Result<()>;
    /// A signal stopped the run and the process is about to die by it. SIGINT (cancel): pending
    /// uploads are dropped at once. SIGTERM (the node is going away): they get the grace period
    /// (`sigterm_grace_s`), so the checkpoint just saved can still reach storage.
    fn on_stopped(&self, signal: StopSignal);
}

/// The job's sync: [`Syncer`] with `--sync`, else [`NoSync`]. Opening a store makes no request
/// yet; [`SyncHooks::before_start`] makes the first.
pub fn from_job(job: &crate::job::JobConfig) -> anyhow::Result<Box<dyn SyncHooks>> {
    let settings = SyncSettings::from_flags(
        job.plugins.sync.as_deref(),
        job.plugins.sync_to.as_deref(),
        job.plugins.sync_config.as_deref(),
    )?;
    Ok(match settings {
        None => Box::new(NoSync),
        Some(settings) => Box::new(Syncer::open(&settings, PluginLimits::from_job(job))?),
    })
}

/// Sync switched off.
pub struct NoSync;

impl SyncHooks for NoSync {
    fn before_start(&self, _: &SyncStart) -> anyhow::Result<Option<u64>> {
        Ok(None)
    }
    fn on_checkpoint_saved(&self, _: &Path) -> anyhow::Result<()> {
        Ok(())
    }
    fn on_run_finished(&self, _: &Path) -> anyhow::Result<()> {
        Ok(())
    }
    fn on_stopped(&self, _: StopSignal) {}
}

/// Knobs tests turn; production uses [`SyncOptions::default`].
#[derive(Debug, Clone, Copy)]
pub struct SyncOptions {
    pub backoff: Backoff,
    pub final_timeout: Duration,
    /// How long a SIGTERM'd run waits for pending uploads.
    pub sigterm_grace: Duration,
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
            sigterm_grace: Duration::from_secs(20),
            start_attempts: 5,
        }
    }
}

/// The run's directories and the local checkpoints sync has seen, set by `before_start`.
struct RunDirs {
    output_dir: PathBuf,
    save_path: PathBuf,
    local_steps: BTreeSet<u64>,
}

/// Sync through a policy (built-in or `.wasm`: events in, actions out) and a store. The policy
/// decides; this type checks its actions and executes them — the resume download blocking, the
/// rest on the background [`Worker`].
pub struct Syncer {
    store: Arc<dyn ObjectStore>,
    policy: Mutex<Box<dyn SyncPolicy>>,
    options: SyncOptions,
    /// `None` once the run finished or was abandoned.
    worker: Mutex<Option<Worker>>,
    run: Mutex<Option<RunDirs>>,
    /// Whether the policy accepted `run-starting` (only then does it hear how the run ended).
    started: std::sync::atomic::AtomicBool,
}

impl Syncer {
    /// Opens the storage and the policy `settings` name.
    pub fn open(settings: &SyncSettings, limits: PluginLimits) -> anyhow::Result<Self> {
        let store: Arc<dyn ObjectStore> = Arc::from(
            crate::storage::open_with(&settings.storage, settings.storage_config.as_ref(), limits)
                .map_err(|e| anyhow::anyhow!("sync: {e}"))?,
        );
        let policy = settings.build_policy(limits)?;
        let options = SyncOptions {
            final_timeout: Duration::from_secs_f64(settings.final_timeout_s),
            sigterm_grace: Duration::from_secs_f64(settings.sigterm_grace_s),
            ..SyncOptions::default()
        };
        Ok(Self::new(store, policy, options))
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
            run: Mutex::new(None),
            started: Default::default(),
        }
    }

    /// Stops at once (SIGINT): pending uploads are dropped.
    pub fn abandon(&self) {
        if let Some(worker) = self.worker.lock().unwrap().take() {
            worker.abandon();
        }
    }

    /// Asks the policy about `event` and checks every action it returns.
    fn decide(&self, event: &Event) -> anyhow::Result<Vec<Action>> {
        let mut policy = self.policy.lock().unwrap();
        let actions = policy
            .on_event(event)
            .map_err(|e| anyhow::anyhow!("sync policy {}: {e}", policy.name()))?;
        let run = self.run.lock().unwrap();
        let (output_dir, save_path) = match run.as_ref() {
            Some(run) => (run.output_dir.as_path(), run.save_path.as_path()),
            None => anyhow::bail!("sync: {} before the run started", event.name()),
        };
        for action in &actions {
            policy::check_action(action, event, output_dir, save_path).map_err(|why| {
                anyhow::anyhow!(
                    "sync policy {} asked for something refused on {}: {why}",
                    policy.name(),
                    event.name()
                )
            })?;
        }
        Ok(actions)
    }

    fn submit(&self, kind: BatchKind, dir: Option<&Path>, actions: Vec<Action>) {
        if actions.is_empty() && kind == BatchKind::Housekeeping {
            return;
        }
        if let Some(worker) = self.worker.lock().unwrap().as_ref() {
            worker.submit(Batch {
                kind,
                dir: dir.map(Path::to_path_buf),
                actions,
            });
        }
    }

    /// The blocking start-up download, retried through transient failures.
    fn download(&self, action: &Action) -> anyhow::Result<Option<u64>> {
        let mut attempt = 0;
        let done = loop {
            match execute::execute(&*self.store, action) {
                Ok(done) => break done,
                Err(err) if err.is_transient() && attempt + 1 < self.options.start_attempts => {
                    let delay = self.options.backoff.delay(attempt);
                    tracing::warn!("sync: resume download failed, retrying in {delay:?}: {err}");
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
        Ok(match done {
            Done::Downloaded { step } => {
                tracing::info!(
                    storage = self.store.url(),
                    step,
                    "resumable checkpoint downloaded"
                );
                Some(step)
            }
            _ => {
                tracing::info!(storage = self.store.url(), "no newer remote checkpoint");
                None
            }
        })
    }

    /// Local checkpoint steps that vanished since the last look (the trainer's rotation), and
    /// the new set.
    fn local_deletions(&self) -> Vec<u64> {
        let mut run = self.run.lock().unwrap();
        let Some(run) = run.as_mut() else {
            return Vec::new();
        };
        let now: BTreeSet<u64> = crate::checkpoint::list(&run.output_dir)
            .map(|all| all.into_iter().map(|(step, _)| step).collect())
            .unwrap_or_default();
        let gone = run.local_steps.difference(&now).copied().collect();
        run.local_steps = now;
        gone
    }
}

impl Drop for Syncer {
    /// A job that ends by an error never calls `on_run_finished`: the policy hears the run
    /// failed, and the checkpoints already queued are still stored (bounded by
    /// `final_timeout_s`), as a failed run's work is worth resuming elsewhere. A job that ends
    /// by a signal never gets here (the process dies by the signal).
    fn drop(&mut self) {
        if self.worker.get_mut().map_or(true, |w| w.is_none()) {
            return;
        }
        if *self.started.get_mut() {
            let failed = Event::RunFinished {
                outcome: RunOutcome::Failed,
                artefacts: Vec::new(),
            };
            match self.decide(&failed) {
                Ok(actions) => self.submit(BatchKind::Housekeeping, None, actions),
                Err(e) => tracing::error!("{e:#}"),
            }
        }
        let Some(worker) = self.worker.get_mut().ok().and_then(Option::take) else {
            return;
        };
        if let Err(e) = worker.finish(self.options.final_timeout) {
            tracing::error!("sync to {} incomplete: {e}", self.store.url());
        }
    }
}

impl SyncHooks for Syncer {
    fn before_start(&self, start: &SyncStart) -> anyhow::Result<Option<u64>> {
        let local_step = manifest::newest_valid_local(&start.output_dir).map(|(step, _)| step);
        *self.run.lock().unwrap() = Some(RunDirs {
            output_dir: start.output_dir.clone(),
            save_path: start.save_path.clone(),
            local_steps: BTreeSet::new(),
        });
        let event = Event::RunStarting(RunStart {
            output_dir: start.output_dir.clone(),
            save_path: start.save_path.clone(),
            resume: start.resume,
            local_step,
            save_total_limit: start.save_total_limit,
        });
        let actions = self.decide(&event)?;
        let (downloads, rest): (Vec<Action>, Vec<Action>) = actions
            .into_iter()
            .partition(|a| matches!(a, Action::DownloadLatestValid { .. }));
        if downloads.is_empty() {
            // Still touch the store now, so bad settings fail before hours of training.
            self.store
                .list("")
                .map_err(|e| anyhow::anyhow!("sync: {e}"))?;
        }
        let mut fetched = None;
        for action in &downloads {
            fetched = self.download(action)?.or(fetched);
        }
        self.local_deletions();
        self.submit(BatchKind::Housekeeping, None, rest);
        self.started
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(fetched)
    }

    fn on_checkpoint_saved(&self, dir: &Path) -> anyhow::Result<()> {
        let saved = events::saved_checkpoint(dir).map_err(|e| anyhow::anyhow!("sync: {e}"))?;
        let step = saved.step;
        let actions = self.decide(&Event::CheckpointSaved(saved))?;
        self.submit(BatchKind::Checkpoint(step), Some(dir), actions);
        for gone in self.local_deletions() {
            let actions = self.decide(&Event::CheckpointDeleted(gone))?;
            self.submit(BatchKind::Housekeeping, None, actions);
        }
        Ok(())
    }

    fn on_run_finished(&self, save_path: &Path) -> anyhow::Result<()> {
        let artefacts = if save_path.is_file() {
            return Err(anyhow::anyhow!(
                "sync: --save_path {} is a file; it must be a directory",
                save_path.display()
            ));
        } else if save_path.is_dir() {
            events::artefacts_in(save_path).map_err(|e| anyhow::anyhow!("sync: {e}"))?
        } else {
            Vec::new()
        };
        let actions = self.decide(&Event::RunFinished {
            outcome: RunOutcome::Completed,
            artefacts,
        })?;
        self.submit(BatchKind::Final, None, actions);
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

    fn on_stopped(&self, signal: StopSignal) {
        match signal {
            StopSignal::Interrupt => self.abandon(),
            StopSignal::Terminate => {
                let Some(worker) = self.worker.lock().unwrap().take() else {
                    return;
                };
                let grace = self.options.sigterm_grace;
                match worker.finish(grace) {
                    Ok(()) => {
                        tracing::info!(storage = self.store.url(), "uploads done before stopping")
                    }
                    Err(e) => tracing::warn!(
                        storage = self.store.url(),
                        "stopping with uploads incomplete after {grace:?}: {e}"
                    ),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::file::FileStore;
    use manifest::write_test_checkpoint;

    /// Records the events it hears, answers with nothing.
    struct Recorder(Arc<Mutex<Vec<String>>>);

    impl SyncPolicy for Recorder {
        fn name(&self) -> &str {
            "recorder"
        }
        fn on_event(&mut self, event: &Event) -> Result<Vec<Action>, String> {
            let what = match event {
                Event::RunStarting(s) => format!("start resume={}", s.resume),
                Event::CheckpointSaved(c) => format!("saved {} ({} files)", c.step, c.files.len()),
                Event::CheckpointDeleted(step) => format!("deleted {step}"),
                Event::RunFinished { outcome, artefacts } => {
                    format!("finished {outcome:?} ({} artefacts)", artefacts.len())
                }
            };
            self.0.lock().unwrap().push(what);
            Ok(Vec::new())
        }
    }

    #[test]
    fn the_policy_hears_every_moment_in_order_including_local_rotation() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(FileStore::new(tmp.path().join("remote")).unwrap());
        let heard = Arc::new(Mutex::new(Vec::new()));
        let sync = Syncer::new(
            store,
            Box::new(Recorder(Arc::clone(&heard))),
            SyncOptions::default(),
        );
        let (out, save) = (tmp.path().join("out"), tmp.path().join("save"));
        let start = SyncStart {
            output_dir: out.clone(),
            save_path: save.clone(),
            resume: false,
            save_total_limit: Some(2),
        };
        sync.before_start(&start).unwrap();
        for step in [1, 2, 3] {
            let dir = write_test_checkpoint(&out, step, &[("w.bin", b"w")]);
            if step == 3 {
                // The trainer's rotation runs before it tells sync about the new checkpoint.
                std::fs::remove_dir_all(out.join("checkpoint-1")).unwrap();
            }
            sync.on_checkpoint_saved(&dir).unwrap();
        }
        std::fs::create_dir_all(&save).unwrap();
        std::fs::write(save.join("adapter_config.json"), b"{}").unwrap();
        sync.on_run_finished(&save).unwrap();
        assert_eq!(
            *heard.lock().unwrap(),
            [
                "start resume=false",
                "saved 1 (2 files)",
                "saved 2 (2 files)",
                "saved 3 (2 files)",
                "deleted 1",
                "finished Completed (1 artefacts)"
            ]
        );
    }
}
