//! `--sync PATH.wasm` end to end through the real binary: the example policy
//! `plugins/sync-sparse` (built by host/build.rs, passed as a user's `.wasm`) uploads every k-th
//! checkpoint, keeps the last N remotely and the final artefacts, against `file://` storage and
//! a real S3-compatible server; a fresh node resumes from what it stored; a plugin of the wrong
//! kind and a config the plugin rejects are one clear error each.

mod support;

use ferrotune::storage::file::FileStore;
use support::s3_server::{S3Server, SECRET};
use support::tiny_job::{
    assert_outputs_stored, bin, fixture, job_args, remote_checkpoints, verify_remote_checkpoint,
    Steps,
};

const SPARSE: &str = env!("FERROTUNE_SYNC_SPARSE_PLUGIN");

/// The storage as `--sync_config` key `storage` or as `--sync_to`: the host takes it either
/// way, and the plugin's `configure` sees only its own keys.
fn sync_args(storage: &str, as_sync_to: bool) -> Vec<String> {
    let mut config = serde_json::json!({"upload_every_steps": 4, "keep_last": 2});
    let mut args = vec!["--resume".to_string(), "--sync".into(), SPARSE.into()];
    if as_sync_to {
        args.extend(["--sync_to".to_string(), storage.to_string()]);
    } else {
        config["storage"] = storage.into();
    }
    args.extend(["--sync_config".to_string(), config.to_string()]);
    args
}

fn run(args: &[String], env: &[(&str, String)]) -> String {
    let out = bin()
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "ferrotune failed: {log}");
    log
}

#[test]
fn a_wasm_policy_syncs_every_kth_checkpoint_and_a_fresh_node_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = fixture(tmp.path());
    let remote = tmp.path().join("remote");
    let storage = format!("file://{}", remote.display());
    let store = FileStore::new(remote.clone()).unwrap();
    let steps = Steps {
        max_steps: 10,
        save_steps: 2,
        save_total_limit: 3,
    };
    let (out1, save1) = (tmp.path().join("n1/ck"), tmp.path().join("n1/final"));
    let mut args = job_args(&model, &data, &out1, &save1, steps);
    args.extend(sync_args(&storage, false));
    let log = run(&args, &[]);
    assert!(log.contains("sync policy plugin loaded"), "{log}");
    assert!(
        log.contains("holding back checkpoint-6"),
        "the plugin's log reaches ours: {log}"
    );
    // Saved: 2 4 6 8 10. Uploaded: 4 and 8 (multiples of 4), then 10 at the end (held back);
    // keep_last 2 leaves 8 and 10.
    assert_eq!(
        remote_checkpoints(&store, "checkpoints"),
        [(8, true), (10, true)]
    );
    for step in [8, 10] {
        verify_remote_checkpoint(&store, "checkpoints", step, &tmp.path().join("check"));
    }
    assert_outputs_stored(&store, &save1, tmp.path());

    // A fresh node with an empty disk resumes from the remote checkpoint-10.
    let (out2, save2) = (tmp.path().join("n2/ck"), tmp.path().join("n2/final"));
    let mut args = job_args(
        &model,
        &data,
        &out2,
        &save2,
        Steps {
            max_steps: 12,
            ..steps
        },
    );
    args.extend(sync_args(&storage, false));
    let log = run(&args, &[]);
    assert!(
        log.contains("resumed from") && log.contains("checkpoint-10"),
        "{log}"
    );
    assert_eq!(
        remote_checkpoints(&store, "checkpoints"),
        [(10, true), (12, true)]
    );
    assert_outputs_stored(&store, &save2, tmp.path());
}

#[test]
fn a_wasm_policy_syncs_to_s3() {
    let server = S3Server::start();
    server.create_bucket("runs");
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = fixture(tmp.path());
    let (out, save) = (tmp.path().join("ck"), tmp.path().join("final"));
    let steps = Steps {
        max_steps: 6,
        save_steps: 2,
        save_total_limit: 2,
    };
    let mut args = job_args(&model, &data, &out, &save, steps);
    args.extend(sync_args("s3://runs/jobs/sparse", true));
    let env = [
        ("AWS_ACCESS_KEY_ID", "test-access-key".to_string()),
        ("AWS_SECRET_ACCESS_KEY", SECRET.to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
        ("AWS_ENDPOINT_URL", server.endpoint()),
    ];
    let log = run(&args, &env);
    assert!(!log.contains(SECRET));
    let store =
        ferrotune::storage::s3::S3Store::connect("runs", "jobs/sparse", server.settings()).unwrap();
    // Saved: 2 4 6; uploaded 4, then 6 at the end; keep_last 2.
    assert_eq!(
        remote_checkpoints(&store, "checkpoints"),
        [(4, true), (6, true)]
    );
    verify_remote_checkpoint(&store, "checkpoints", 6, &tmp.path().join("check"));
    assert_outputs_stored(&store, &save, tmp.path());
}

#[test]
fn wrong_plugins_and_rejected_configs_are_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = fixture(tmp.path());
    let steps = Steps {
        max_steps: 2,
        save_steps: 2,
        save_total_limit: 2,
    };
    let storage = format!(r#""storage": "file://{}/remote""#, tmp.path().display());
    let cases = [
        (
            env!("FERROTUNE_EVIL_PLUGIN"),
            format!("{{{storage}}}"),
            "this is a formatter plugin, not a sync policy",
        ),
        (
            SPARSE,
            format!(r#"{{{storage}, "upload_every_steps": 0}}"#),
            "rejected it: invalid config: upload_every_steps must be >= 1",
        ),
        (
            SPARSE,
            format!(r#"{{{storage}, "every": 3}}"#),
            "unknown field `every`",
        ),
    ];
    for (plugin, config, needle) in cases {
        let mut args = job_args(
            &model,
            &data,
            &tmp.path().join("o"),
            &tmp.path().join("s"),
            steps,
        );
        args.extend(["--sync", plugin, "--sync_config", &config].map(String::from));
        let out = bin().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{plugin} {config}: {err}");
        assert!(err.contains(needle), "{needle:?} not in: {err}");
        assert!(
            !tmp.path().join("o/checkpoint-2").exists(),
            "trained despite the error"
        );
    }
}

/// `ferrotune plugin new --kind sync` → build → a run syncs through it: every checkpoint
/// uploaded, the newest `keep_last` kept, the adapter stored at the end, the policy's log in
/// ours; a fresh node resumes from storage; a config its `new` rejects is one clear error.
#[test]
fn a_scaffolded_sync_policy_builds_and_syncs_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    let wasm = support::scaffold::scaffold_and_build("sync", "ck-sync", tmp.path());
    let wasm = wasm.to_string_lossy().into_owned();
    let (model, data) = fixture(tmp.path());
    let remote = tmp.path().join("remote");
    let store = FileStore::new(remote.clone()).unwrap();
    let config = |extra: &str| {
        format!(
            r#"{{"storage": "file://{}", "keep_last": 2{extra}}}"#,
            remote.display()
        )
    };
    let steps = Steps {
        max_steps: 6,
        save_steps: 2,
        save_total_limit: 3,
    };
    let (out1, save1) = (tmp.path().join("n1/ck"), tmp.path().join("n1/final"));
    let mut args = job_args(&model, &data, &out1, &save1, steps);
    args.extend(
        [
            "--resume",
            "--sync",
            &wasm,
            "--sync_config",
            &config(r#", "artefacts": ["adapter"]"#),
        ]
        .map(String::from),
    );
    let log = run(&args, &[]);
    assert!(log.contains("uploading the Adapter in"), "{log}");
    assert_eq!(
        remote_checkpoints(&store, "checkpoints"),
        [(4, true), (6, true)]
    );
    verify_remote_checkpoint(&store, "checkpoints", 6, &tmp.path().join("check"));
    assert_outputs_stored(&store, &save1, tmp.path());

    // A fresh node resumes from checkpoint-6; its default `artefacts` (adapter, gguf) store
    // the new adapter too.
    let (out2, save2) = (tmp.path().join("n2/ck"), tmp.path().join("n2/final"));
    let mut args = job_args(
        &model,
        &data,
        &out2,
        &save2,
        Steps {
            max_steps: 8,
            ..steps
        },
    );
    args.extend(["--resume", "--sync", &wasm, "--sync_config", &config("")].map(String::from));
    let log = run(&args, &[]);
    assert!(
        log.contains("resumed from") && log.contains("checkpoint-6"),
        "{log}"
    );
    assert_eq!(
        remote_checkpoints(&store, "checkpoints"),
        [(6, true), (8, true)]
    );
    assert_outputs_stored(&store, &save2, tmp.path());

    let mut args = job_args(
        &model,
        &data,
        &tmp.path().join("o"),
        &tmp.path().join("s"),
        steps,
    );
    args.extend(
        [
            "--sync",
            &wasm,
            "--sync_config",
            &config(r#", "artefacts": ["logz"]"#),
        ]
        .map(String::from),
    );
    let out = bin().args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(r#"artefacts: unknown kind "logz""#), "{err}");
    assert!(
        !tmp.path().join("o/checkpoint-2").exists(),
        "trained despite the error"
    );
}
