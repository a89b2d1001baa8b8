//! Storage backends against real servers: the S3 backend against moto's S3 server (started on
//! 127.0.0.1 by the test), and sync end to end over it.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferrotune::storage::s3::S3Store;
use ferrotune::storage::{ObjectStore, StorageError};
use ferrotune::sync::policy::Mirror;
use ferrotune::sync::worker::Backoff;
use ferrotune::sync::{SyncHooks, SyncOptions, SyncStart, Syncer};
use support::s3_server::{S3Server, SECRET};
use support::{keys, pattern};

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn s3_round_trip_single_and_multipart_with_prefix_isolation() {
    let server = S3Server::start();
    server.create_bucket("ckpts");
    let mut settings = server.settings();
    settings.part_size = 64 * 1024;
    let store = S3Store::connect("ckpts", "jobs/a", settings.clone()).unwrap();
    let other = S3Store::connect("ckpts", "jobs/b", settings).unwrap();
    let tmp = tempfile::tempdir().unwrap();

    let small = tmp.path().join("small.json");
    write(&small, b"{\"step\": 1}");
    let big = tmp.path().join("big.bin");
    let big_bytes = pattern(64 * 1024 * 5 + 123); // 6 parts, the last one short
    write(&big, &big_bytes);

    assert_eq!(
        store
            .put_file("checkpoint-1/state.json", &small)
            .unwrap()
            .size,
        11
    );
    let info = store.put_file("checkpoint-1/adapter.bin", &big).unwrap();
    assert_eq!(info.size, big_bytes.len() as u64);
    assert!(
        info.etag.as_deref().unwrap_or("").contains("-6"),
        "multipart ETag: {info:?}"
    );
    other.put_file("checkpoint-9/x", &small).unwrap();

    assert_eq!(
        keys(&store, ""),
        ["checkpoint-1/adapter.bin", "checkpoint-1/state.json"]
    );
    assert_eq!(keys(&store, "checkpoint-1/s"), ["checkpoint-1/state.json"]);
    assert_eq!(keys(&other, ""), ["checkpoint-9/x"]);

    let got = tmp.path().join("down/adapter.bin");
    store.get_file("checkpoint-1/adapter.bin", &got).unwrap();
    assert_eq!(std::fs::read(&got).unwrap(), big_bytes);

    assert_eq!(
        store.head("checkpoint-1/state.json").unwrap().unwrap().size,
        11
    );
    assert!(store.head("checkpoint-1/none").unwrap().is_none());
    store.delete("checkpoint-1/state.json").unwrap();
    store.delete("checkpoint-1/state.json").unwrap();
    assert_eq!(keys(&store, ""), ["checkpoint-1/adapter.bin"]);
    let err = store
        .get_file("checkpoint-1/state.json", &tmp.path().join("gone"))
        .unwrap_err();
    assert!(matches!(err, StorageError::NotFound(_)), "{err}");
    assert!(!tmp.path().join("gone").exists());
}

#[test]
fn s3_download_of_a_tampered_object_fails_and_leaves_no_file() {
    let server = S3Server::start();
    server.create_bucket("ckpts");
    let store = S3Store::connect("ckpts", "", server.settings()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("w.bin");
    write(&src, b"original weights");
    store.put_file("w.bin", &src).unwrap();
    // Replace the body behind our back but keep the recorded SHA-256.
    let sha = "2a0f7b3a2b5d3a8f9a6f2e1b7c4d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d";
    let stored = {
        let dest = tmp.path().join("first");
        store.get_file("w.bin", &dest).unwrap();
        std::fs::read(dest).unwrap()
    };
    assert_eq!(stored, b"original weights");
    let status = server.raw(
        "PUT",
        "/ckpts/w.bin",
        &[("x-amz-meta-sha256", sha)],
        b"tampered weights",
    );
    assert_eq!(status, 200);
    let dest = tmp.path().join("second");
    let err = store.get_file("w.bin", &dest).unwrap_err();
    assert!(matches!(err, StorageError::Integrity(_)), "{err}");
    assert!(!dest.exists(), "a corrupt download must not land");
}

#[test]
fn s3_settings_errors_name_what_to_fix_and_never_the_secret() {
    let server = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("f");
    write(&src, b"x");

    let missing = S3Store::connect("no-such-bucket", "p", server.settings()).unwrap();
    let err = missing.put_file("k", &src).unwrap_err();
    assert!(matches!(err, StorageError::Config(_)), "{err}");
    assert!(err.to_string().contains("no-such-bucket"), "{err}");

    let mut unreachable = server.settings();
    unreachable.endpoint = Some("http://127.0.0.1:9".to_string());
    unreachable.max_attempts = 2;
    let store = S3Store::connect("ckpts", "", unreachable).unwrap();
    let err = store.list("").unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("AWS_ENDPOINT_URL"), "{err}");

    for text in [
        format!("{err}"),
        format!("{err:?}"),
        format!("{:?}", server.settings()),
    ] {
        assert!(!text.contains(SECRET), "secret leaked: {text}");
    }
}

/// Writes `OUTPUT_DIR/checkpoint-<step>` with a manifest (as the checkpoint writer does).
fn save_checkpoint(output_dir: &Path, step: u64) -> std::path::PathBuf {
    use sha2::{Digest, Sha256};
    let dir = output_dir.join(format!("checkpoint-{step}"));
    let files = [
        ("adapter_model.safetensors", pattern(1000 + step as usize)),
        (
            "trainer_state.json",
            format!("{{\"global_step\": {step}}}").into_bytes(),
        ),
    ];
    let mut entries = serde_json::Map::new();
    for (name, body) in &files {
        write(&dir.join(name), body);
        let sha: String = Sha256::digest(body)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        entries.insert(
            name.to_string(),
            serde_json::json!({"size": body.len(), "sha256": sha}),
        );
    }
    let manifest = serde_json::json!({
        "format": "ferrotune-checkpoint", "version": 1, "global_step": step, "files": entries
    });
    write(&dir.join("manifest.json"), manifest.to_string().as_bytes());
    dir
}

fn fast_options() -> SyncOptions {
    SyncOptions {
        backoff: Backoff {
            base: Duration::from_millis(20),
            cap: Duration::from_millis(200),
        },
        final_timeout: Duration::from_secs(60),
        sigterm_grace: Duration::from_secs(10),
        start_attempts: 3,
    }
}

fn mirror_syncer(store: Arc<dyn ObjectStore>) -> Syncer {
    let policy = Mirror::new("checkpoints", "outputs");
    Syncer::new(store, Box::new(policy), fast_options())
}

fn start(output_dir: &Path, save_path: &Path, resume: bool, limit: Option<usize>) -> SyncStart {
    SyncStart {
        output_dir: output_dir.to_path_buf(),
        save_path: save_path.to_path_buf(),
        resume,
        save_total_limit: limit,
    }
}

#[test]
fn sync_mirrors_a_run_to_s3_and_a_fresh_node_resumes_from_it() {
    let server = S3Server::start();
    server.create_bucket("runs");
    let store: Arc<dyn ObjectStore> =
        Arc::new(S3Store::connect("runs", "jobs/job-1", server.settings()).unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let output_dir = tmp.path().join("node1/checkpoints");
    let save_path = tmp.path().join("node1/outputs");

    // A run with --save_total_limit 2 on node 1.
    let sync = mirror_syncer(Arc::clone(&store));
    let run = start(&output_dir, &save_path, true, Some(2));
    assert_eq!(sync.before_start(&run).unwrap(), None);
    for step in [10, 20, 30] {
        let dir = save_checkpoint(&output_dir, step);
        sync.on_checkpoint_saved(&dir).unwrap();
        if step == 30 {
            std::fs::remove_dir_all(output_dir.join("checkpoint-10")).unwrap();
        }
    }
    write(&save_path.join("adapter_model.safetensors"), &pattern(5000));
    write(&save_path.join("adapter_config.json"), b"{}");
    sync.on_run_finished(&save_path).unwrap();

    let remote = keys(&*store, "");
    assert!(
        remote.contains(&"outputs/adapter_model.safetensors".to_string()),
        "{remote:?}"
    );
    assert!(
        remote.contains(&"outputs/adapter_config.json".to_string()),
        "{remote:?}"
    );
    let steps: Vec<&str> = remote
        .iter()
        .filter_map(|k| k.strip_prefix("checkpoints/"))
        .filter_map(|k| k.split('/').next())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(
        steps,
        ["checkpoint-20", "checkpoint-30"],
        "rotation mirrored: {remote:?}"
    );

    // Node 2 starts on an empty disk and resumes from the newest valid checkpoint.
    let node2 = tmp.path().join("node2/checkpoints");
    let sync2 = mirror_syncer(Arc::clone(&store));
    let run2 = start(&node2, &tmp.path().join("node2/outputs"), true, Some(2));
    assert_eq!(sync2.before_start(&run2).unwrap(), Some(30));
    for name in [
        "adapter_model.safetensors",
        "trainer_state.json",
        "manifest.json",
    ] {
        assert_eq!(
            std::fs::read(node2.join("checkpoint-30").join(name)).unwrap(),
            std::fs::read(output_dir.join("checkpoint-30").join(name)).unwrap(),
            "{name}"
        );
    }
    sync2.abandon();
}

#[test]
fn a_failed_run_uploads_checkpoints_but_not_final_artefacts() {
    let server = S3Server::start();
    server.create_bucket("runs");
    let store: Arc<dyn ObjectStore> =
        Arc::new(S3Store::connect("runs", "", server.settings()).unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let output_dir = tmp.path().join("ck");
    let save_path = tmp.path().join("out");
    let sync = mirror_syncer(Arc::clone(&store));
    sync.before_start(&start(&output_dir, &save_path, false, None))
        .unwrap();
    sync.on_checkpoint_saved(&save_checkpoint(&output_dir, 5))
        .unwrap();
    write(&save_path.join("partial.bin"), b"half");
    // The job fails: the syncer is dropped without `on_run_finished`.
    drop(sync);
    let remote = keys(&*store, "");
    assert_eq!(remote.len(), 3, "{remote:?}");
    assert!(
        remote
            .iter()
            .all(|k| k.starts_with("checkpoints/checkpoint-5/")),
        "{remote:?}"
    );
}

#[test]
fn sync_rides_out_a_storage_outage() {
    let server = S3Server::start();
    server.create_bucket("runs");
    let tmp = tempfile::tempdir().unwrap();
    let output_dir = tmp.path().join("ck");
    let real: Arc<dyn ObjectStore> =
        Arc::new(S3Store::connect("runs", "", server.settings()).unwrap());
    let flaky = Arc::new(support::flaky::FlakyStore::new(Arc::clone(&real), 0));
    let sync = mirror_syncer(flaky.clone());
    let absent = tmp.path().join("absent");
    sync.before_start(&start(&output_dir, &absent, false, None))
        .unwrap();
    // The next five storage calls fail as during an outage; sync must retry through it.
    flaky.fail_next(5);
    sync.on_checkpoint_saved(&save_checkpoint(&output_dir, 1))
        .unwrap();
    sync.on_run_finished(&absent).unwrap();
    assert_eq!(keys(&*real, "checkpoints/checkpoint-1/").len(), 3);
}
