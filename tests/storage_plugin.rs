//! Storage backends as plugins: the example `http-store` plugin (`plugins/http-store`, a WebDAV
//! client over `wasi:http`) against a real WebDAV server (wsgidav, started on 127.0.0.1 with
//! basic auth) — object round trips, a training run syncing through it with
//! `--sync_to PLUGIN.wasm`, the host's allow-list, wrong credentials, and secrets never printed.
//!
//! Needs `wsgidav` (`pip install wsgidav==4.3.3 cheroot==11.1.2`, see .ci/run): without it the tests
//! print SKIPPED, and fail under CI=true.

mod support;

use std::process::Output;
use std::time::Duration;

use ferrotune::plugin::PluginLimits;
use ferrotune::storage::file::FileStore;
use ferrotune::storage::{ObjectStore, StorageError};
use support::dav_server::{DavServer, PASSWORD, USER};
use support::tiny_job::{self, Steps};
use support::{keys, pattern};

/// The example plugin, built by host/build.rs (never embedded in the binary).
const PLUGIN: &str = env!("FERROTUNE_HTTP_STORE_PLUGIN");

/// What these tests ask of the server: the plugin's `storage_config`, a store opened through it.
trait HttpStoreServer {
    fn storage_config(&self, password: &str, allow: &[String]) -> serde_json::Value;
    fn open(&self, config: &serde_json::Value, limits: PluginLimits) -> Box<dyn ObjectStore>;
}

impl HttpStoreServer for DavServer {
    /// The plugin's `storage_config` for this server.
    fn storage_config(&self, password: &str, allow: &[String]) -> serde_json::Value {
        serde_json::json!({
            "base_url": format!("http://{}/dav/jobs/run-1", self.authority()),
            "username": USER,
            "secrets": {"password": password},
            "allow_hosts": allow,
        })
    }

    fn open(&self, config: &serde_json::Value, limits: PluginLimits) -> Box<dyn ObjectStore> {
        ferrotune::storage::open_with(PLUGIN, Some(config), limits).unwrap()
    }
}

#[test]
fn objects_round_trip_through_the_plugin_streaming_large_bodies() {
    let Some(server) = DavServer::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // 16 MiB of plugin memory for a 24 MiB object: the body can only have been streamed.
    let limits = PluginLimits {
        memory_mb: 16,
        timeout: Duration::from_secs(30),
    };
    let store = server.open(
        &server.storage_config(PASSWORD, &[server.authority()]),
        limits,
    );
    let remote = server.root.join("jobs/run-1");

    let small = tmp.path().join("small.txt");
    std::fs::write(&small, b"hello webdav").unwrap();
    let big = tmp.path().join("big.bin");
    let big_bytes = pattern(24 << 20);
    std::fs::write(&big, &big_bytes).unwrap();

    let put = store.put_file("a.txt", &small).unwrap();
    assert_eq!((put.key.as_str(), put.size), ("a.txt", 12));
    let put = store
        .put_file("deep/nested/prefix/big shard.bin", &big)
        .unwrap();
    assert_eq!(put.size, big_bytes.len() as u64);
    assert!(put.etag.is_some(), "wsgidav sends an ETag");
    store
        .put_file("deep/nested/prefix-2/x.bin", &small)
        .unwrap();
    // What the server holds, read from its disk, not through the plugin.
    assert_eq!(
        std::fs::read(remote.join("a.txt")).unwrap(),
        b"hello webdav"
    );
    assert!(
        std::fs::read(remote.join("deep/nested/prefix/big shard.bin")).unwrap() == big_bytes,
        "the big object differs on the server"
    );

    assert_eq!(
        keys(&*store, ""),
        [
            "a.txt",
            "deep/nested/prefix-2/x.bin",
            "deep/nested/prefix/big shard.bin"
        ]
    );
    assert_eq!(
        keys(&*store, "deep/nested/prefix/"),
        ["deep/nested/prefix/big shard.bin"]
    );
    // A prefix that ends inside a segment matches like an S3 prefix.
    assert_eq!(keys(&*store, "deep/nested/pre").len(), 2);
    assert!(keys(&*store, "nothing/here/").is_empty());

    let head = store
        .head("deep/nested/prefix/big shard.bin")
        .unwrap()
        .unwrap();
    assert_eq!(head.size, big_bytes.len() as u64);
    assert!(head.modified_ms.is_some());
    assert!(store.head("deep/missing.bin").unwrap().is_none());

    let got = tmp.path().join("got/big.bin");
    let info = store
        .get_file("deep/nested/prefix/big shard.bin", &got)
        .unwrap();
    assert_eq!(info.size, big_bytes.len() as u64);
    assert!(
        std::fs::read(&got).unwrap() == big_bytes,
        "download differs"
    );

    let missing = tmp.path().join("got/missing.bin");
    let err = store.get_file("deep/missing.bin", &missing).unwrap_err();
    assert!(matches!(err, StorageError::NotFound(_)), "{err}");
    assert!(!missing.exists(), "a failed download left a file");

    store.delete("deep/nested/prefix/big shard.bin").unwrap();
    store.delete("deep/nested/prefix/big shard.bin").unwrap();
    assert!(store
        .head("deep/nested/prefix/big shard.bin")
        .unwrap()
        .is_none());
    assert!(!remote.join("deep/nested/prefix/big shard.bin").exists());
    assert_eq!(keys(&*store, "deep/"), ["deep/nested/prefix-2/x.bin"]);
}

#[test]
fn requests_outside_the_allow_list_are_refused_by_the_host() {
    let Some(server) = DavServer::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("f.txt");
    std::fs::write(&file, b"x").unwrap();
    // The plugin is pointed at the server, but the job allows another authority only.
    let other = "127.0.0.1:9".to_string();
    let store = server.open(
        &server.storage_config(PASSWORD, std::slice::from_ref(&other)),
        PluginLimits::default(),
    );
    for err in [
        store.put_file("a/f.txt", &file).unwrap_err(),
        store.list("").unwrap_err(),
    ] {
        let text = err.to_string();
        assert!(
            matches!(err, StorageError::Config(_)),
            "not a settings error: {text}"
        );
        assert!(text.contains(&server.authority()), "{text}");
        assert!(
            text.contains("allow_hosts") && text.contains(&other),
            "{text}"
        );
        assert!(text.contains("refused"), "{text}");
    }
    assert!(
        std::fs::read_dir(&server.root).unwrap().next().is_none(),
        "a refused request reached the server"
    );
    // No allow-list at all: no network.
    let store = server.open(
        &server.storage_config(PASSWORD, &[]),
        PluginLimits::default(),
    );
    let err = store.head("x").unwrap_err().to_string();
    assert!(err.contains("no network"), "{err}");
}

fn run(args: &[String]) -> (Output, String) {
    let out = tiny_job::bin().args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

fn sync_flags(config: &serde_json::Value) -> Vec<String> {
    let config = serde_json::json!({ "storage_config": config }).to_string();
    [
        "--sync",
        "mirror",
        "--sync_to",
        PLUGIN,
        "--sync_config",
        &config,
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn a_training_run_syncs_through_the_plugin_and_a_fresh_node_resumes() {
    let Some(server) = DavServer::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = tiny_job::fixture(tmp.path());
    let config = server.storage_config(PASSWORD, &[server.authority()]);
    let node = |name: &str, max_steps: u64| {
        let out = tmp.path().join(name).join("ck");
        let save = tmp.path().join(name).join("final");
        let steps = Steps {
            max_steps,
            save_steps: 2,
            save_total_limit: 2,
        };
        let mut args = tiny_job::job_args(&model, &data, &out, &save, steps);
        args.push("--resume".into());
        args.extend(sync_flags(&config));
        let (done, text) = run(&args);
        assert!(done.status.success(), "{name}: {text}");
        assert!(
            !text.contains(PASSWORD),
            "{name} printed the password: {text}"
        );
        (save, text)
    };

    let (save, text) = node("node1", 6);
    assert!(
        text.contains("storage plugin"),
        "no plugin log line: {text}"
    );
    assert!(
        text.contains("<redacted>"),
        "the config is not logged redacted: {text}"
    );
    let remote = server.root.join("jobs/run-1");
    // Checkpoints and the final save are on the server, complete and verifiable.
    let on_server = FileStore::new(remote.clone()).unwrap();
    let steps = tiny_job::remote_checkpoints(&on_server, "checkpoints");
    assert_eq!(steps, [(4, true), (6, true)], "rotation mirrored remotely");
    let check = tmp.path().join("check");
    tiny_job::verify_remote_checkpoint(&on_server, "checkpoints", 6, &check);
    for file in tiny_job::files_under(&save) {
        assert_eq!(
            std::fs::read(remote.join("outputs").join(&file)).unwrap(),
            std::fs::read(save.join(&file)).unwrap(),
            "outputs/{file} differs on the server"
        );
    }
    assert!(remote.join("outputs/adapter_model.safetensors").is_file());

    // A fresh node with an empty disk resumes from the server's newest checkpoint.
    let (_, text) = node("node2", 8);
    assert!(
        text.contains("checkpoint-6"),
        "node2 did not resume: {text}"
    );
    let steps = tiny_job::remote_checkpoints(&on_server, "checkpoints");
    assert_eq!(steps, [(6, true), (8, true)]);
}

#[test]
fn wrong_credentials_fail_naming_the_key_and_secrets_are_never_printed() {
    let Some(server) = DavServer::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = tiny_job::fixture(tmp.path());
    let wrong = "wrong-Pw-77-unique";
    let config = server.storage_config(wrong, &[server.authority()]);
    let steps = Steps {
        max_steps: 2,
        save_steps: 2,
        save_total_limit: 1,
    };
    let out = tmp.path().join("ck");
    let mut args = tiny_job::job_args(&model, &data, &out, &tmp.path().join("final"), steps);
    args.extend(sync_flags(&config));
    let (done, text) = run(&args);
    assert_eq!(done.status.code(), Some(1), "{text}");
    assert!(text.contains("storage_config.secrets.password"), "{text}");
    assert!(text.contains("401"), "{text}");
    assert!(!text.contains(wrong), "the password was printed: {text}");
    assert!(
        !out.join("checkpoint-2").exists(),
        "trained despite unusable storage"
    );

    // --dry_run prints the resolved flags with the secret redacted.
    args.push("--dry_run".into());
    let (done, text) = run(&args);
    assert!(done.status.success(), "{text}");
    assert!(
        !text.contains(wrong),
        "--dry_run printed the password: {text}"
    );
    assert!(text.contains("<redacted>"), "{text}");
}

#[test]
fn storage_flags_are_checked_before_anything_runs() {
    let plugin_config = |extra: &str| format!(r#"{{"storage_config": {{{extra}}}}}"#);
    for (args, needle) in [
        (
            vec![
                "--sync_to",
                "s3://bucket/x",
                "--sync_config",
                &plugin_config(""),
            ],
            "only for storage plugins",
        ),
        (
            vec!["--sync_to", "/nonexistent/store.wasm"],
            "--sync_to /nonexistent/store.wasm: cannot read it",
        ),
        (
            vec![
                "--sync_to",
                PLUGIN,
                "--sync_config",
                &plugin_config(r#""allow_hosts": ["example.com"]"#),
            ],
            "allow_hosts: \"example.com\" needs a port",
        ),
        (
            vec![
                "--sync_to",
                PLUGIN,
                "--sync_config",
                r#"{"storage": "file:///tmp/other"}"#,
            ],
            "name different storages",
        ),
    ] {
        let mut all = vec!["--dry_run"];
        all.extend(args.iter().copied());
        let out = tiny_job::bin().args(&all).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{all:?}: {err}");
        assert!(err.contains(needle), "{all:?}: {err}");
    }
}

#[test]
fn plugin_inspect_describes_a_storage_plugin() {
    let out = tiny_job::bin()
        .args(["plugin", "inspect", PLUGIN])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "kind:        storage",
        "name:        http-store",
        "\"base_url\"",
    ] {
        assert!(text.contains(needle), "{needle:?} missing: {text}");
    }
}

/// Opening a store never needs the server: the plugin is loaded and configured only.
#[test]
fn the_plugin_rejects_a_bad_base_url_when_opened() {
    let config = serde_json::json!({"base_url": "ftp://x/y"});
    let err = ferrotune::storage::open_with(PLUGIN, Some(&config), PluginLimits::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("storage_config.base_url"), "{err}");
}
