//! Fault injection against ferrotune's own sync, through the real binary and a real
//! S3-compatible server (moto) behind a TCP proxy the tests control:
//!
//! - kills at 10 random points (seeded, printed; `FERROTUNE_FAULT_SEED` replays a run) —
//!   between steps, while a checkpoint is half written, while a checkpoint is half uploaded —
//!   each followed by a restart on an empty disk with `--resume` and the same storage: the run
//!   finishes with every step's loss and the final adapter bitwise equal to an uninterrupted
//!   run's, and every remote checkpoint verifies against its manifest;
//! - a storage outage mid-run: training keeps stepping, and everything ends up stored;
//! - SIGINT with sync on: death by SIGINT, nothing partial locally, no final upload;
//! - bad credentials, a missing bucket, an unreachable endpoint: one clear error naming what
//!   to fix, never the secret.

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use ferrotune::storage::s3::S3Store;
use ferrotune::storage::ObjectStore;
use rand::{Rng, SeedableRng};
use support::s3_server::{S3Server, SECRET};
use support::tcp_proxy::TcpProxy;
use support::tiny_job::{
    assert_outputs_stored, bin, fixture, job_args, losses, remote_checkpoints,
    verify_remote_checkpoint, Steps,
};

const BUCKET: &str = "faults";

/// moto behind a proxy, with the bucket made.
struct Storage {
    server: S3Server,
    proxy: TcpProxy,
}

impl Storage {
    fn start() -> Storage {
        let server = S3Server::start();
        server.create_bucket(BUCKET);
        let proxy = TcpProxy::start(server.port);
        Storage { server, proxy }
    }

    /// The trainer's environment: credentials and the proxy as endpoint.
    fn env(&self) -> Vec<(&'static str, String)> {
        aws_env(&self.proxy.endpoint())
    }

    /// A client that talks to moto directly (not through the proxy).
    fn store(&self, prefix: &str) -> S3Store {
        S3Store::connect(BUCKET, prefix, self.server.settings()).unwrap()
    }
}

fn aws_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", "test-access-key".into()),
        ("AWS_SECRET_ACCESS_KEY", SECRET.into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ENDPOINT_URL", endpoint.into()),
    ]
}

/// `--sync_to URL` alone means the built-in `mirror`; the end of a run waits at most 2 minutes.
fn mirror_args(storage_url: &str) -> Vec<String> {
    let config = r#"{"final_timeout_s": 120}"#;
    ["--sync_to", storage_url, "--sync_config", config]
        .map(String::from)
        .to_vec()
}

/// A running trainer whose stderr lines arrive on a channel (and are kept for messages).
struct Trainer {
    child: Child,
    lines: Receiver<String>,
    log: Vec<String>,
}

impl Trainer {
    /// Sends `signal` ("INT", "TERM") as Kelpie's worker supervisor would.
    fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal} failed");
    }

    fn spawn(args: &[String], env: &[(&str, String)], extra: &[(&str, String)]) -> Trainer {
        let mut child = bin()
            .args(args)
            .envs(env.iter().chain(extra).map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (send, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if send.send(strip_ansi(&line)).is_err() {
                    return;
                }
            }
        });
        Trainer {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// Reads lines until one satisfies `hit` (true) or the process ended (false); panics
    /// after `within`.
    fn wait_for(&mut self, within: Duration, hit: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = hit(&line);
                    self.log.push(line);
                    if found {
                        return true;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return false,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!("nothing expected within {within:?}; log:\n{}", self.tail());
                }
            }
        }
    }

    /// Waits for the exit (bounded), draining the log.
    fn finish(&mut self, within: Duration) -> std::process::ExitStatus {
        self.wait_for(within, |_| false);
        self.child.wait().unwrap()
    }

    fn tail(&self) -> String {
        let from = self.log.len().saturating_sub(40);
        self.log[from..].join("\n")
    }
}

/// The log's colours, removed (`\x1b[...m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn step_line(line: &str) -> Option<u64> {
    let rest = &line[line.find("step ")? + 5..];
    rest.split('/').next()?.parse().ok()
}

fn uploaded_line(line: &str) -> bool {
    line.contains("uploaded") && line.contains("key=")
}

/// The checkpoint an upload log line is about (`key=…/checkpoint-N/…`), if any.
fn uploaded_checkpoint(line: &str) -> Option<u64> {
    if !uploaded_line(line) {
        return None;
    }
    let rest = &line[line.find("checkpoint-")? + "checkpoint-".len()..];
    rest.split('/').next()?.parse().ok()
}

/// Newest remote checkpoint whose manifest is there (0 when none).
fn remote_resume_point(store: &dyn ObjectStore) -> u64 {
    remote_checkpoints(store, "checkpoints")
        .into_iter()
        .filter(|(_, complete)| *complete)
        .map(|(step, _)| step)
        .max()
        .unwrap_or(0)
}

/// Every remote checkpoint with a manifest verifies; returns how many lack one (uploads cut
/// off, never taken as valid).
fn check_remote(store: &dyn ObjectStore, scratch: &Path) -> usize {
    let mut incomplete = 0;
    for (step, complete) in remote_checkpoints(store, "checkpoints") {
        if complete {
            let dir = scratch.join(format!("verify-{}", rand::random::<u64>()));
            verify_remote_checkpoint(store, "checkpoints", step, &dir);
            let _ = std::fs::remove_dir_all(dir);
        } else {
            incomplete += 1;
        }
    }
    incomplete
}

#[derive(Debug, Clone, Copy)]
enum Kill {
    /// SIGKILL once step N is logged (uploads of earlier checkpoints may be in flight).
    AfterStep(u64),
    /// SIGKILL while the first checkpoint at or after step N that gets uploaded is half
    /// uploaded: on its first uploaded file the proxy freezes storage traffic, so the manifest
    /// (uploaded last) cannot follow. "At or after": with `--save_total_limit` the uploader
    /// rightly skips a checkpoint a newer save rotated away before its upload began.
    MidUpload(u64),
    /// Abort while checkpoint-N is half written (`FERROTUNE_CRASH_IN_SAVE`, a test hook in the
    /// checkpoint writer: the process dies at that exact point, as a kill would leave it).
    MidSave(u64),
}

#[test]
fn killed_at_random_points_and_restarted_on_an_empty_disk_loses_nothing() {
    let seed = std::env::var("FERROTUNE_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!("fault seed {seed} (replay with FERROTUNE_FAULT_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = fixture(tmp.path());
    let steps = Steps {
        max_steps: 40,
        save_steps: 2,
        save_total_limit: 2,
    };
    let straight_save = tmp.path().join("straight-final");
    let straight = tmp.path().join("straight");
    let out = bin()
        .args(job_args(&model, &data, &straight, &straight_save, steps))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference = losses(&straight);
    assert_eq!(reference.len(), steps.max_steps as usize);

    let storage = Storage::start();
    let store = storage.store("job");
    let args_for = |node: &Path| {
        let mut args = job_args(&model, &data, &node.join("ck"), &node.join("final"), steps);
        args.push("--resume".into());
        args.extend(mirror_args(&format!("s3://{BUCKET}/job")));
        args
    };
    let mut caught_mid_upload = 0;
    for round in 0..10 {
        let resumed_at = remote_resume_point(&store);
        // Targets spread over the next few checkpoints; all before the last step, so every
        // round ends by the kill.
        let next_checkpoint = (resumed_at / steps.save_steps + 1) * steps.save_steps;
        let checkpoint = next_checkpoint + steps.save_steps * rng.random_range(0..3);
        let last_ok = steps.max_steps - 1;
        let kill = match rng.random_range(0..3) {
            0 => Kill::AfterStep(resumed_at + rng.random_range(1..=6)),
            1 => Kill::MidUpload(checkpoint),
            _ => Kill::MidSave(checkpoint),
        };
        let kill = match kill {
            Kill::AfterStep(s) | Kill::MidUpload(s) | Kill::MidSave(s) if s > last_ok => {
                Kill::AfterStep(last_ok.min(resumed_at + 1))
            }
            kill => kill,
        };
        println!("round {round}: remote resume point {resumed_at}, kill {kill:?}");
        let node = tmp.path().join(format!("node{round}"));
        let crash = match kill {
            Kill::MidSave(step) => vec![("FERROTUNE_CRASH_IN_SAVE", step.to_string())],
            _ => Vec::new(),
        };
        let mut trainer = Trainer::spawn(&args_for(&node), &storage.env(), &crash);
        let within = Duration::from_secs(60);
        // The checkpoint whose upload a `MidUpload` kill cut.
        let mut cut_upload = None;
        match kill {
            Kill::AfterStep(step) => {
                assert!(
                    trainer.wait_for(within, |l| step_line(l) >= Some(step)),
                    "ended before step {step}:\n{}",
                    trainer.tail()
                );
                trainer.child.kill().unwrap();
            }
            Kill::MidUpload(step) => {
                let hit = trainer.wait_for(within, |l| uploaded_checkpoint(l) >= Some(step));
                storage.proxy.freeze();
                assert!(
                    hit,
                    "no checkpoint from step {step} on was uploaded:\n{}",
                    trainer.tail()
                );
                trainer.child.kill().unwrap();
                cut_upload = trainer.log.last().and_then(|l| uploaded_checkpoint(l));
            }
            Kill::MidSave(_) => {}
        }
        let status = trainer.finish(within);
        storage.proxy.up();
        // Requests the freeze held reach the server now; let them land before looking.
        std::thread::sleep(Duration::from_millis(500));
        let expected = if matches!(kill, Kill::MidSave(_)) {
            6
        } else {
            9
        };
        assert_eq!(
            status.signal(),
            Some(expected),
            "round {round} {kill:?}: {status:?}\n{}",
            trainer.tail()
        );
        check_remote(&store, tmp.path());
        if let Some(step) = cut_upload {
            let remote = remote_checkpoints(&store, "checkpoints");
            caught_mid_upload += usize::from(remote.contains(&(step, false)));
        }
    }
    println!("kills that left a half-uploaded checkpoint behind: {caught_mid_upload}");

    // The last restart runs to the end.
    let node = tmp.path().join("last");
    let mut trainer = Trainer::spawn(&args_for(&node), &storage.env(), &[]);
    let status = trainer.finish(Duration::from_secs(90));
    assert!(status.success(), "{status:?}\n{}", trainer.tail());
    assert_eq!(
        losses(&node.join("ck")),
        reference,
        "per-step losses differ"
    );
    let adapter = "adapter_model.safetensors";
    assert_eq!(
        std::fs::read(node.join("final").join(adapter)).unwrap(),
        std::fs::read(straight_save.join(adapter)).unwrap(),
        "final adapters differ"
    );
    assert_eq!(
        remote_checkpoints(&store, "checkpoints"),
        [(38, true), (40, true)],
        "remote rotation"
    );
    assert_eq!(check_remote(&store, tmp.path()), 0);
    assert_outputs_stored(&store, &node.join("final"), tmp.path());
}

#[test]
fn a_storage_outage_never_pauses_training_and_everything_ends_up_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = fixture(tmp.path());
    let storage = Storage::start();
    let steps = Steps {
        max_steps: 24,
        save_steps: 2,
        save_total_limit: 2,
    };
    let (ck, save) = (tmp.path().join("ck"), tmp.path().join("final"));
    let mut args = job_args(&model, &data, &ck, &save, steps);
    args.extend(mirror_args(&format!("s3://{BUCKET}/job")));
    let mut trainer = Trainer::spawn(&args, &storage.env(), &[]);
    let within = Duration::from_secs(60);
    assert!(
        trainer.wait_for(within, uploaded_line),
        "{}",
        trainer.tail()
    );

    // Storage goes away for a few seconds.
    storage.proxy.down();
    let down_at = Instant::now();
    let mut steps_during_outage = Vec::new();
    let mut uploads_during_outage = 0;
    let outage = Duration::from_secs(4);
    while down_at.elapsed() < outage {
        let left = outage.saturating_sub(down_at.elapsed());
        let Ok(line) = trainer.lines.recv_timeout(left) else {
            continue;
        };
        steps_during_outage.extend(step_line(&line));
        uploads_during_outage += usize::from(uploaded_line(&line));
        trainer.log.push(line);
    }
    storage.proxy.up();
    let after_outage = trainer.log.len();
    println!("steps logged during the outage: {steps_during_outage:?}");
    assert!(
        !steps_during_outage.is_empty(),
        "training paused during the outage:\n{}",
        trainer.tail()
    );
    // At most one upload logged just before the cut can arrive late; none completes while
    // storage is down (the SDK's retries, then sync's own, wait it out).
    assert!(uploads_during_outage <= 1, "{}", trainer.tail());
    let status = trainer.finish(Duration::from_secs(90));
    assert!(status.success(), "{status:?}\n{}", trainer.tail());
    let resumed = trainer.log[after_outage..]
        .iter()
        .filter(|l| uploaded_line(l))
        .count();
    assert!(
        resumed > 0,
        "no uploads after the outage:\n{}",
        trainer.tail()
    );
    let log = trainer.log.join("\n");
    println!(
        "uploads after the outage: {resumed}; sync-level retries: {}",
        log.matches("storage failure, retrying").count()
    );
    assert!(log.contains("sync complete"), "{}", trainer.tail());
    assert!(!log.contains(SECRET));

    let store = storage.store("job");
    assert_eq!(
        remote_checkpoints(&store, "checkpoints"),
        [(22, true), (24, true)]
    );
    assert_eq!(check_remote(&store, tmp.path()), 0);
    assert_outputs_stored(&store, &save, tmp.path());
}

#[test]
fn sigint_with_sync_dies_by_sigint_leaving_nothing_partial_and_no_final_upload() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = fixture(tmp.path());
    let storage = Storage::start();
    let steps = Steps {
        max_steps: 100_000,
        save_steps: 2,
        save_total_limit: 2,
    };
    let (ck, save) = (tmp.path().join("ck"), tmp.path().join("final"));
    let mut args = job_args(&model, &data, &ck, &save, steps);
    args.extend(mirror_args(&format!("s3://{BUCKET}/job")));
    let mut trainer = Trainer::spawn(&args, &storage.env(), &[]);
    assert!(
        trainer.wait_for(Duration::from_secs(60), uploaded_line),
        "{}",
        trainer.tail()
    );
    trainer.signal("INT");
    let status = trainer.finish(Duration::from_secs(60));
    assert_eq!(status.signal(), Some(2), "{status:?}\n{}", trainer.tail());
    let hidden: Vec<PathBuf> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "partial checkpoint left: {hidden:?}");
    assert!(!save.exists(), "final artefacts written by a cancelled run");
    let store = storage.store("job");
    assert!(
        store.list("outputs/").unwrap().is_empty(),
        "final upload after SIGINT"
    );
    // What was uploaded before the cancel is whole or has no manifest.
    check_remote(&store, tmp.path());
}

#[test]
fn sigterm_with_sync_stores_the_last_step_before_dying_by_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = fixture(tmp.path());
    let storage = Storage::start();
    // No periodic checkpoint comes before the SIGTERM: the one saved on the way out is the
    // only one, and it must reach storage within the grace period.
    let steps = Steps {
        max_steps: 100_000,
        save_steps: 50_000,
        save_total_limit: 2,
    };
    let (ck, save) = (tmp.path().join("ck"), tmp.path().join("final"));
    let mut args = job_args(&model, &data, &ck, &save, steps);
    args.extend(mirror_args(&format!("s3://{BUCKET}/job")));
    let mut trainer = Trainer::spawn(&args, &storage.env(), &[]);
    assert!(
        trainer.wait_for(Duration::from_secs(60), |l| step_line(l) >= Some(3)),
        "{}",
        trainer.tail()
    );
    trainer.signal("TERM");
    let status = trainer.finish(Duration::from_secs(60));
    assert_eq!(status.signal(), Some(15), "{status:?}\n{}", trainer.tail());
    let log = trainer.log.join("\n");
    assert!(
        log.contains("uploads done before stopping"),
        "{}",
        trainer.tail()
    );
    let local: Vec<u64> = std::fs::read_dir(&ck)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.strip_prefix("checkpoint-")?.parse().ok()
        })
        .collect();
    assert_eq!(local.len(), 1, "{local:?}");
    let store = storage.store("job");
    assert_eq!(
        remote_checkpoints(&store, "checkpoints"),
        [(local[0], true)]
    );
    assert_eq!(check_remote(&store, tmp.path()), 0);
    assert!(
        !save.exists(),
        "final artefacts written by a terminated run"
    );
    assert!(store.list("outputs/").unwrap().is_empty());
}

/// Runs a 2-step job syncing to `url` with `env`; returns (exit code, stderr).
fn failing_run(url: &str, env: &[(&'static str, String)], resume: bool) -> (Option<i32>, String) {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = fixture(tmp.path());
    let steps = Steps {
        max_steps: 2,
        save_steps: 2,
        save_total_limit: 2,
    };
    let ck = tmp.path().join("ck");
    let mut args = job_args(&model, &data, &ck, &tmp.path().join("final"), steps);
    if resume {
        args.push("--resume".into());
    }
    args.extend(mirror_args(url));
    let started = Instant::now();
    let out = bin()
        .args(&args)
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    println!("{url}: failed in {:.1}s", started.elapsed().as_secs_f64());
    assert!(!ck.join("checkpoint-2").exists(), "trained despite: {err}");
    (out.status.code(), err)
}

/// A failed run ends with exactly one `error: ` line naming `needle` (plus at most its copy in
/// the log); the secret appears nowhere.
fn assert_one_clear_error(code: Option<i32>, log: &str, needle: &str) {
    assert!(matches!(code, Some(c) if c != 0), "exit {code:?}: {log}");
    assert!(!log.contains(SECRET), "the secret leaked: {log}");
    let last: Vec<&str> = log.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(last.len(), 1, "not one error: {log}");
    assert!(last[0].contains(needle), "{needle:?} not in {:?}", last[0]);
    let logged = log.lines().filter(|l| l.contains("ERROR")).count();
    assert!(logged <= 1, "more than one error logged: {log}");
}

#[test]
fn bad_storage_settings_are_one_clear_error_naming_the_fix() {
    // Credentials a real server rejects: moto checking access keys against its empty IAM.
    let strict = S3Server::start_with_env(&[("INITIAL_NO_AUTH_ACTION_COUNT", "0")]);
    let (code, log) = failing_run(
        &format!("s3://{BUCKET}/job"),
        &aws_env(&strict.endpoint()),
        true,
    );
    assert_one_clear_error(code, &log, "AWS_ACCESS_KEY_ID");
    drop(strict);

    let storage = Storage::start();
    let (code, log) = failing_run("s3://no-such-bucket/job", &storage.env(), true);
    assert_one_clear_error(code, &log, "bucket \"no-such-bucket\" does not exist");

    let mut missing = storage.env();
    missing.retain(|(k, _)| *k != "AWS_SECRET_ACCESS_KEY");
    let (code, log) = failing_run(&format!("s3://{BUCKET}/job"), &missing, true);
    assert_one_clear_error(code, &log, "AWS_SECRET_ACCESS_KEY is not set");

    // Nothing listens on port 9: the SDK's retries run out, naming the endpoint variable.
    let (code, log) = failing_run(
        &format!("s3://{BUCKET}/job"),
        &aws_env("http://127.0.0.1:9"),
        false,
    );
    assert_one_clear_error(code, &log, "AWS_ENDPOINT_URL");
}
