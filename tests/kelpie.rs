//! ferrotune under Kelpie's rules, driven through the built binary: sync flags are checked
//! before anything runs (exit 2, one line naming the fix); SIGINT ends a training run by SIGINT
//! with nothing partial left; `--sync mirror` keeps a remote copy a fresh node resumes from.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn ferrotune(args: &[&str], job_id: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ferrotune"));
    command.args(args).env_remove("KELPIE_JOB_ID");
    if let Some(id) = job_id {
        command.env("KELPIE_JOB_ID", id);
    }
    command.output().expect("run ferrotune")
}

fn assert_usage_error(args: &[&str], needle: &str) {
    let out = ferrotune(args, None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    assert!(err.contains(needle), "{err:?} does not mention {needle:?}");
}

#[test]
fn sync_flags_are_checked_before_anything_runs() {
    assert_usage_error(
        &["--dry_run", "--sync", "mirror"],
        "--sync needs --sync_config",
    );
    assert_usage_error(
        &[
            "--dry_run",
            "--sync_config",
            r#"{"storage": "file:///tmp/x"}"#,
        ],
        "add --sync mirror",
    );
    assert_usage_error(
        &[
            "--dry_run",
            "--sync",
            "/no/such/policy.wasm",
            "--sync_config",
            r#"{"storage": "file:///tmp/x"}"#,
        ],
        "--sync /no/such/policy.wasm: cannot read it",
    );
    assert_usage_error(
        &["--dry_run", "--sync", "mirror", "--sync_config", "{}"],
        "the storage URL is missing",
    );
    assert_usage_error(
        &[
            "--dry_run",
            "--sync",
            "mirror",
            "--sync_config",
            r#"{"storage": "gs://b/p"}"#,
        ],
        "unsupported scheme",
    );
    assert_usage_error(
        &[
            "--dry_run",
            "--sync",
            "mirror",
            "--sync_config",
            r#"{"storage": "s3://b-1/p", "bucket": "x"}"#,
        ],
        "unknown field",
    );
    assert_usage_error(
        &[
            "--dry_run",
            "--sync",
            "mirror",
            "--sync_config",
            r#"{"storage": "s3://b-1/jobs/{job_id}"}"#,
        ],
        "KELPIE_JOB_ID is not set",
    );
}

#[test]
fn a_job_id_prefix_resolves_under_kelpie() {
    let config = r#"{"storage": "s3://my-bucket/jobs/{job_id}", "checkpoints_prefix": "ck"}"#;
    let out = ferrotune(
        &["--dry_run", "--sync", "mirror", "--sync_config", config],
        Some("job-7"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["sync"], "mirror");
}

/// A tiny model (made by `ferrotune demo`, which also trains it for 2 steps) and the bundled
/// demo dataset.
fn demo_assets(work: &Path) -> (PathBuf, PathBuf) {
    let out = ferrotune(
        &[
            "demo",
            "--workdir",
            &work.to_string_lossy(),
            "--max_steps",
            "2",
        ],
        None,
    );
    // Only the model it writes first is needed; two steps are too few for the demo's own
    // loss check, so its exit status says nothing here.
    drop(out);
    fn find_model(dir: &Path) -> Option<PathBuf> {
        if dir.join("config.json").is_file() && dir.join("tokenizer.json").is_file() {
            return Some(dir.to_path_buf());
        }
        std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
            let p = e.path();
            if p.is_dir() {
                find_model(&p)
            } else {
                None
            }
        })
    }
    let model = find_model(&work.join("cache")).expect("the demo wrote a model directory");
    let dataset = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/alpaca_demo.jsonl");
    (model, dataset)
}

fn train_args(model: &Path, dataset: &Path, out: &Path, save: &Path, steps: &str) -> Vec<String> {
    let s = |p: &Path| p.to_string_lossy().into_owned();
    [
        "--model_name",
        &s(model),
        "--dataset",
        &s(dataset),
        "--output_dir",
        &s(out),
        "--save_path",
        &s(save),
        "--device",
        "cpu",
        "--max_seq_length",
        "64",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "1",
        "--max_steps",
        steps,
        "--save_steps",
        "1",
        "--save_total_limit",
        "2",
        "--report_to",
        "none",
        "--logging_steps",
        "1",
        "--save_model",
        "--save_method",
        "lora",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

/// Checkpoint steps in `out`, and whether anything else (a hidden staging directory) is there.
fn checkpoints(out: &Path) -> (Vec<u64>, Vec<String>) {
    let mut steps = Vec::new();
    let mut other = Vec::new();
    for entry in std::fs::read_dir(out).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        match name
            .strip_prefix("checkpoint-")
            .and_then(|n| n.parse().ok())
        {
            Some(step) => steps.push(step),
            None if name.starts_with('.') => other.push(name),
            None => {}
        }
    }
    steps.sort();
    (steps, other)
}

#[test]
fn sigint_stops_training_dies_by_sigint_and_the_run_resumes() {
    use std::os::unix::process::ExitStatusExt;
    let tmp = tempfile::tempdir().unwrap();
    let (model, dataset) = demo_assets(&tmp.path().join("demo"));
    let out = tmp.path().join("ck");
    let save = tmp.path().join("final");
    let args = train_args(&model, &dataset, &out, &save, "100000");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(&args)
        .env_remove("KELPIE_JOB_ID")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Bounded wait for the first complete checkpoint, then cancel as Kelpie does.
    let deadline = Instant::now() + Duration::from_secs(120);
    while checkpoints(&out).0.is_empty() {
        assert!(Instant::now() < deadline, "no checkpoint within 120 s");
        assert!(child.try_wait().unwrap().is_none(), "training ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -INT failed");
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(signal_hook::consts::SIGINT),
        "status {status:?}"
    );
    let (steps, leftovers) = checkpoints(&out);
    assert!(
        leftovers.is_empty(),
        "partial artefacts left: {leftovers:?}"
    );
    assert!(!save.exists(), "final artefacts written by a cancelled run");
    let newest = *steps.last().unwrap();

    // Resumable: the same job with --resume continues after the newest checkpoint and ends.
    let mut resumed = train_args(&model, &dataset, &out, &save, &(newest + 2).to_string());
    resumed.push("--resume".into());
    let done = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(&resumed)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "resume failed: {log}");
    assert!(
        log.contains(&format!("checkpoint-{newest}")),
        "did not resume: {log}"
    );
    assert!(save.join("adapter_model.safetensors").is_file());
}

#[test]
fn sync_mirrors_checkpoints_and_outputs_and_a_fresh_node_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, dataset) = demo_assets(&tmp.path().join("demo"));
    let remote = tmp.path().join("remote");
    let config = format!(
        r#"{{"storage": "file://{}/jobs/{{job_id}}"}}"#,
        remote.display()
    );
    let run = |node: &str, steps: &str| {
        let out = tmp.path().join(node).join("ck");
        let save = tmp.path().join(node).join("final");
        let mut args = train_args(&model, &dataset, &out, &save, steps);
        args.extend(["--resume", "--sync", "mirror", "--sync_config", &config].map(String::from));
        let done = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
            .args(&args)
            .env("KELPIE_JOB_ID", "job-9")
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&done.stderr).into_owned();
        assert!(done.status.success(), "{node}: {log}");
        log
    };
    run("node1", "3");
    let job = remote.join("jobs/job-9");
    let (steps, _) = checkpoints(&job.join("checkpoints"));
    assert_eq!(steps, [2, 3], "remote mirrors --save_total_limit 2");
    assert!(job.join("checkpoints/checkpoint-3/manifest.json").is_file());
    assert!(job.join("outputs/adapter_model.safetensors").is_file());
    // A fresh node with an empty disk continues from the remote checkpoint-3.
    let log = run("node2", "4");
    assert!(log.contains("checkpoint-3"), "node2 did not resume: {log}");
    assert_eq!(checkpoints(&job.join("checkpoints")).0, [3, 4]);
}
