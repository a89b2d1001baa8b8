//! ferrotune under Kelpie's rules, driven through the built binary: sync flags are checked
//! before anything runs (exit 2, one line naming the fix).

use std::process::{Command, Output};

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
        &["--dry_run", "--sync", "policy.wasm", "--sync_config", "{}"],
        "sync plugin runtime",
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
