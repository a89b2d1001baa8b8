//! The background uploader: executes batches of actions in order on its own thread, so storage
//! never stalls training. Transient failures are retried with exponential backoff and full
//! jitter until they succeed or the run ends. A queued checkpoint whose directory the trainer
//! has already rotated away (`--save_total_limit`) is skipped, so a backlog built up during an
//! outage stays as small as the local output directory.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::execute::{execute, Done};
use super::policy::Action;
use crate::storage::ObjectStore;

/// What a batch is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchKind {
    Checkpoint(u64),
    /// Actions for other events (a local deletion, the start of a run): their failures are
    /// reported, but no checkpoint or artefact depends on them.
    Housekeeping,
    Final,
}

#[derive(Debug)]
pub struct Batch {
    pub kind: BatchKind,
    /// For checkpoint batches: the local directory; once it is gone the batch is moot.
    pub dir: Option<std::path::PathBuf>,
    pub actions: Vec<Action>,
}

/// Backoff between attempts of one action: `min(cap, base·2^n)` scaled by a random factor in
/// [0, 1] ("full jitter"), so many workers hitting one recovering store spread out.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.cap);
        exp.mul_f64(rand::random_range(0.0..=1.0))
    }
}

#[derive(Default)]
struct State {
    queue: VecDeque<Batch>,
    busy: bool,
    /// Set by `abandon`: stop at once, leave the queue.
    abandoned: bool,
    closing: bool,
    /// Errors that retrying cannot fix, and batches that never made it.
    failures: Vec<String>,
    /// Whether the newest checkpoint batch and the final batch completed.
    newest_checkpoint: Option<(u64, bool)>,
    final_done: Option<bool>,
}

pub struct Worker {
    shared: Arc<(Mutex<State>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    pub fn start(store: Arc<dyn ObjectStore>, backoff: Backoff) -> Self {
        let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("ferrotune-sync".into())
            .spawn(move || run(&*store, &thread_shared, backoff))
            .expect("spawn the sync thread");
        Worker {
            shared,
            thread: Some(thread),
        }
    }

    pub fn submit(&self, batch: Batch) {
        let (lock, wake) = &*self.shared;
        let mut state = lock.lock().unwrap();
        if let BatchKind::Checkpoint(step) = batch.kind {
            state.newest_checkpoint = Some((step, false));
        }
        if batch.kind == BatchKind::Final {
            state.final_done = Some(false);
        }
        state.queue.push_back(batch);
        wake.notify_all();
    }

    /// Waits until every batch is done or `deadline` passes, then stops the thread. Errors when
    /// the newest checkpoint or the final artefacts are not safely stored.
    pub fn finish(mut self, deadline: Duration) -> Result<(), String> {
        let (lock, wake) = &*self.shared;
        let until = Instant::now() + deadline;
        let mut state = lock.lock().unwrap();
        state.closing = true;
        wake.notify_all();
        while !state.queue.is_empty() || state.busy {
            let now = Instant::now();
            if now >= until {
                break;
            }
            state = wake.wait_timeout(state, until - now).unwrap().0;
        }
        let pending = state.queue.len() + usize::from(state.busy);
        state.abandoned = true;
        wake.notify_all();
        let mut problems = std::mem::take(&mut state.failures);
        if pending > 0 {
            problems.push(format!(
                "{pending} upload batch(es) still pending after waiting {deadline:?} for storage"
            ));
        }
        if let Some((step, false)) = state.newest_checkpoint {
            problems.push(format!("checkpoint-{step} (the newest) is not uploaded"));
        }
        if state.final_done == Some(false) {
            problems.push("the final artefacts are not uploaded".to_string());
        }
        drop(state);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// Stops without waiting (SIGINT): what is in flight is dropped; a half-uploaded checkpoint
    /// has no manifest remotely, so it is never taken as valid.
    pub fn abandon(mut self) {
        let (lock, wake) = &*self.shared;
        lock.lock().unwrap().abandoned = true;
        wake.notify_all();
        self.thread.take();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let (lock, wake) = &*self.shared;
        lock.lock().unwrap().abandoned = true;
        wake.notify_all();
    }
}

fn run(store: &dyn ObjectStore, shared: &(Mutex<State>, Condvar), backoff: Backoff) {
    let (lock, wake) = shared;
    loop {
        let batch = {
            let mut state = lock.lock().unwrap();
            loop {
                if state.abandoned || (state.closing && state.queue.is_empty()) {
                    return;
                }
                if let Some(batch) = state.queue.pop_front() {
                    if batch.dir.as_ref().is_some_and(|dir| !dir.exists()) {
                        tracing::info!(?batch.kind, "skipping upload: rotated away locally");
                        continue;
                    }
                    state.busy = true;
                    break batch;
                }
                state = wake.wait(state).unwrap();
            }
        };
        let ok = run_batch(store, shared, &batch, backoff);
        let mut state = lock.lock().unwrap();
        state.busy = false;
        match batch.kind {
            BatchKind::Checkpoint(step) => {
                if state
                    .newest_checkpoint
                    .is_some_and(|(newest, _)| newest == step)
                {
                    state.newest_checkpoint = Some((step, ok));
                }
            }
            BatchKind::Final => state.final_done = Some(ok),
            BatchKind::Housekeeping => {}
        }
        wake.notify_all();
    }
}

/// Whether `batch` is a checkpoint upload that the trainer's rotation is deleting or deleted:
/// its directory is gone, or the file `action` uploads is (the trainer never removes single
/// files of a complete checkpoint, and `remove_dir_all` removes the files before the directory).
fn rotated_away(batch: &Batch, action: &Action) -> bool {
    if !matches!(batch.kind, BatchKind::Checkpoint(_)) {
        return false;
    }
    let dir_gone = batch.dir.as_ref().is_some_and(|dir| !dir.exists());
    let file_gone = matches!(action, Action::Upload { local, .. } if !local.exists());
    dir_gone || file_gone
}

/// Runs one batch's actions in order; returns whether all succeeded.
fn run_batch(
    store: &dyn ObjectStore,
    shared: &(Mutex<State>, Condvar),
    batch: &Batch,
    backoff: Backoff,
) -> bool {
    let (lock, wake) = shared;
    for action in &batch.actions {
        let mut attempt = 0u32;
        loop {
            match execute(store, action) {
                Ok(done) => {
                    log_done(store, &done);
                    break;
                }
                Err(_) if rotated_away(batch, action) => {
                    // The trainer rotated this checkpoint away while it went up (the error may
                    // surface as a local NotFound or as the S3 body stream failing): a newer one
                    // exists locally and carries the state.
                    tracing::info!(?batch.kind, "checkpoint vanished locally before upload; skipped");
                    return true;
                }
                Err(err) if err.is_transient() => {
                    let delay = backoff.delay(attempt);
                    tracing::warn!(
                        storage = store.url(),
                        attempt = attempt + 1,
                        retry_in_ms = delay.as_millis() as u64,
                        "storage failure, retrying: {err}"
                    );
                    attempt += 1;
                    let state = lock.lock().unwrap();
                    let (state, _) = wake
                        .wait_timeout_while(state, delay, |s| !s.abandoned)
                        .unwrap();
                    if state.abandoned {
                        return false;
                    }
                }
                Err(err) => {
                    tracing::error!(storage = store.url(), "sync failed: {err}");
                    lock.lock().unwrap().failures.push(err.to_string());
                    return false;
                }
            }
        }
    }
    true
}

fn log_done(store: &dyn ObjectStore, done: &Done) {
    match done {
        Done::Uploaded { key, size } => {
            tracing::debug!(storage = store.url(), key, size, "uploaded")
        }
        Done::Deleted { key } => tracing::debug!(storage = store.url(), key, "deleted"),
        Done::Rotated {
            deleted_checkpoints,
        } if !deleted_checkpoints.is_empty() => {
            tracing::info!(
                storage = store.url(),
                ?deleted_checkpoints,
                "rotated remote checkpoints"
            )
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_whose_files_vanish_mid_rotation_is_skipped_not_failed() {
        let tmp = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> =
            Arc::new(crate::storage::file::FileStore::new(tmp.path().join("remote")).unwrap());
        // The directory is still there (remove_dir_all is half done), the file is gone.
        let dir = tmp.path().join("checkpoint-3");
        std::fs::create_dir_all(&dir).unwrap();
        let backoff = Backoff {
            base: Duration::from_millis(1),
            cap: Duration::from_millis(1),
        };
        let upload = |kind| Batch {
            kind,
            dir: Some(dir.clone()),
            actions: vec![Action::Upload {
                local: dir.join("optimizer.safetensors"),
                key: "ck/checkpoint-3/optimizer.safetensors".into(),
            }],
        };
        let worker = Worker::start(Arc::clone(&store), backoff);
        worker.submit(upload(BatchKind::Checkpoint(3)));
        worker.finish(Duration::from_secs(10)).unwrap();
        // The same missing file outside a checkpoint batch is a real failure.
        let worker = Worker::start(store, backoff);
        worker.submit(upload(BatchKind::Final));
        let err = worker.finish(Duration::from_secs(10)).unwrap_err();
        assert!(err.contains("optimizer.safetensors"), "{err}");
    }

    #[test]
    fn backoff_grows_to_the_cap_and_never_exceeds_it() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
        };
        for attempt in 0..40 {
            let exp = Duration::from_millis(100)
                .saturating_mul(1 << attempt.min(16))
                .min(Duration::from_secs(2));
            assert!(b.delay(attempt) <= exp, "attempt {attempt}");
        }
    }
}
