//! `--publish PATH.wasm` end to end through the built binary: the `ferrotune plugin new --kind
//! publish` scaffold, built as a plugin author would, uploads a tiny run's saves (adapter and
//! GGUF) to a real WebDAV server (wsgidav, basic auth) — every byte checked on the server's
//! disk, the password (from the environment) in no output; `ferrotune export` publishes the same
//! way; a host outside `allow_hosts`, a wrong password and a plugin of another kind each fail
//! with one clear line, the first two keeping the saves and naming the retry.
//!
//! Needs `wsgidav` (see tests/support/dav_server.rs): without it the tests print SKIPPED, and
//! fail under CI=true.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use support::dav_server::{DavServer, PASSWORD, USER};
use support::scaffold::scaffold_and_build;
use support::tiny_job::{bin, fixture, job_args, Steps};

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn steps() -> Steps {
    Steps {
        max_steps: 2,
        save_steps: 2,
        save_total_limit: 1,
    }
}

/// `--publish_config` for `server` under `/dav/<dir>`, the password read from `PUBLISH_PW`.
fn publish_config(server: &DavServer, dir: &str, allow: &[String]) -> String {
    serde_json::json!({
        "base_url": format!("http://{}/dav/{dir}", server.authority()),
        "username": USER,
        "secrets": {"password": {"env": "PUBLISH_PW"}},
        "allow_hosts": allow,
    })
    .to_string()
}

/// Every file of `save` is in `dir`, byte for byte; returns how many.
fn assert_published(save: &Path, dir: &Path) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(save).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let stored = std::fs::read(dir.join(&name))
            .unwrap_or_else(|e| panic!("{name} was not published to {}: {e}", dir.display()));
        assert!(stored == std::fs::read(&path).unwrap(), "{name} differs");
        n += 1;
    }
    n
}

/// The publish scaffold, built once for this file's tests: they run in parallel, and two
/// builds of one crate name would overwrite each other's component in the shared target
/// directory. Written under that directory, not a temporary one, since a static is never dropped.
fn put_up_wasm() -> &'static Path {
    static WASM: OnceLock<PathBuf> = OnceLock::new();
    WASM.get_or_init(|| {
        let work = Path::new(env!("FERROTUNE_PLUGIN_TARGET_DIR")).join("scaffold-tests");
        let _ = std::fs::remove_dir_all(work.join("put-up"));
        std::fs::create_dir_all(&work).unwrap();
        scaffold_and_build("publish", "put-up", &work)
    })
}

fn publish_run(command: &mut Command, password: &str) -> Output {
    command.env("PUBLISH_PW", password).output().unwrap()
}

#[test]
fn a_scaffolded_publish_plugin_uploads_the_saves_of_a_run_and_of_an_export() {
    let Some(server) = DavServer::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let wasm = put_up_wasm();
    let inspect = bin()
        .args(["plugin", "inspect"])
        .arg(wasm)
        .output()
        .unwrap();
    let text = output_text(&inspect);
    assert!(
        text.contains("kind:        publish")
            && text.contains("name:        put-up")
            && text.contains("description: uploads the saved files with HTTP PUT"),
        "{text}"
    );
    let (model, data) = fixture(tmp.path());
    let (out, save) = (tmp.path().join("out"), tmp.path().join("save"));
    std::fs::create_dir_all(server.root.join("run")).unwrap();
    let allow = [server.authority()];
    let run = publish_run(
        bin()
            .args(job_args(&model, &data, &out, &save, steps()))
            .args(["--save_gguf", "--quantization", "q8_0", "--publish"])
            .arg(wasm)
            .args(["--publish_config", &publish_config(&server, "run", &allow)]),
        PASSWORD,
    );
    let text = output_text(&run);
    assert!(run.status.success(), "{text}");
    assert!(!text.contains(PASSWORD), "the password leaked:\n{text}");
    // Adapter files, the GGUF file and its Modelfile.
    assert!(assert_published(&save, &server.root.join("run")) >= 5);
    assert!(
        text.contains("published with put_up.wasm: http://127.0.0.1:")
            && text.contains("/dav/run/adapter_model.safetensors"),
        "{text}"
    );

    // `ferrotune export` takes the same flags.
    std::fs::create_dir_all(server.root.join("export")).unwrap();
    let again = tmp.path().join("again");
    let export = publish_run(
        bin()
            .args(["export", "--adapter", save.to_str().unwrap()])
            .args(["--base", model.to_str().unwrap(), "--save_method", "lora"])
            .args(["--save_path", again.to_str().unwrap(), "--publish"])
            .arg(wasm)
            .args([
                "--publish_config",
                &publish_config(&server, "export", &allow),
            ]),
        PASSWORD,
    );
    let text = output_text(&export);
    assert!(export.status.success(), "{text}");
    assert!(assert_published(&again, &server.root.join("export")) >= 3);
}

#[test]
fn refused_hosts_wrong_passwords_and_wrong_kinds_fail_clearly() {
    let Some(server) = DavServer::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let wasm = put_up_wasm();
    let (model, data) = fixture(tmp.path());
    std::fs::create_dir_all(server.root.join("run")).unwrap();
    let run = |name: &str, plugin: &Path, config: String, password: &str| {
        let (out, save) = (
            tmp.path().join(name).join("out"),
            tmp.path().join(name).join("save"),
        );
        let output = publish_run(
            bin()
                .args(job_args(&model, &data, &out, &save, steps()))
                .arg("--publish")
                .arg(plugin)
                .args(["--publish_config", &config]),
            password,
        );
        (output, out, save)
    };

    // Not in allow_hosts: the host refuses the request; the saves stay, the retry is named.
    let (refused, _, save) = run(
        "refused",
        wasm,
        publish_config(&server, "run", &[]),
        PASSWORD,
    );
    let text = output_text(&refused);
    assert_eq!(refused.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("tried to reach {}", server.authority()))
            && text.contains("not in --publish_config allow_hosts")
            && text.contains("publish again without retraining: ferrotune export --adapter"),
        "{text}"
    );
    assert!(save.join("adapter_model.safetensors").is_file());
    assert!(std::fs::read_dir(server.root.join("run"))
        .unwrap()
        .next()
        .is_none());

    // A wrong password: the server's 401 in one line, neither password printed.
    let allow = [server.authority()];
    let wrong = "wrong-pw-Q7x!secret";
    let (denied, _, _) = run(
        "denied",
        wasm,
        publish_config(&server, "run", &allow),
        wrong,
    );
    let text = output_text(&denied);
    assert_eq!(denied.status.code(), Some(1), "{text}");
    assert!(text.contains("answered HTTP 401"), "{text}");
    assert!(!text.contains(wrong) && !text.contains(PASSWORD), "{text}");

    // --dry_run shows the config with an inline secret redacted.
    let inline = serde_json::json!({"base_url": "http://x:1", "secrets": {"password": PASSWORD}});
    let dry = bin()
        .args(job_args(
            &model,
            &data,
            &tmp.path().join("o"),
            &tmp.path().join("s"),
            steps(),
        ))
        .arg("--publish")
        .arg(wasm)
        .args(["--publish_config", &inline.to_string(), "--dry_run"])
        .output()
        .unwrap();
    let text = output_text(&dry);
    assert!(dry.status.success(), "{text}");
    assert!(
        text.contains("<redacted>") && !text.contains(PASSWORD),
        "{text}"
    );

    // A plugin of another kind: exit 2 before training.
    let sync = Path::new(env!("FERROTUNE_SYNC_SPARSE_PLUGIN"));
    let (kind, out, _) = run("kind", sync, "{}".into(), PASSWORD);
    let text = output_text(&kind);
    assert_eq!(kind.status.code(), Some(2), "{text}");
    assert!(
        text.contains("this is a sync plugin, not a publish plugin"),
        "{text}"
    );
    assert!(
        !out.join("checkpoint-2").exists(),
        "trained despite the error"
    );
}
