//! End-to-end tests of `--push_model` / `--push_gguf` through the built binary: a tiny LoRA run
//! (and `ferrotune export`) push their saves to a local fake Hub (tests/python/fake_hub_upload.py,
//! `HF_ENDPOINT`) through the embedded `hf-hub` publish plugin. Checks every pushed byte, that
//! LFS storage URLs never see the token, that the token appears in no output, and that a refused
//! push keeps the saves and says how to retry. With CI=true a missing python3 fails the test.

mod support;

use std::path::Path;
use std::process::Output;

use support::fake_hub::FakeHub;
use support::tiny_job::{bin, fixture, job_args, Steps};

const SECRET: &str = "hf_SECRET_publish_token_42";

/// The fake Hub with `token`: files of 4 KiB or more go through LFS, objects over 256 KiB are
/// uploaded in parts.
fn fake_hub(store: &Path, token: &str) -> Option<FakeHub> {
    FakeHub::start(store, token, 4096, 262_144)
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every file of `save` is in `repo`, byte for byte.
fn assert_pushed(save: &Path, repo: &Path, pick: impl Fn(&str) -> bool) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(save).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !path.is_file() || !pick(&name) {
            continue;
        }
        let pushed = std::fs::read(repo.join(&name))
            .unwrap_or_else(|e| panic!("{name} was not pushed to {}: {e}", repo.display()));
        assert!(pushed == std::fs::read(&path).unwrap(), "{name} differs");
        n += 1;
    }
    n
}

fn is_gguf(name: &str) -> bool {
    name.ends_with(".gguf") || name == "Modelfile"
}

fn steps() -> Steps {
    Steps {
        max_steps: 2,
        save_steps: 2,
        save_total_limit: 1,
    }
}

#[test]
fn training_pushes_the_adapter_and_the_gguf_files_in_one_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(hub) = fake_hub(&tmp.path().join("hub"), SECRET) else {
        return;
    };
    let (model, data) = fixture(tmp.path());
    let (out, save) = (tmp.path().join("out"), tmp.path().join("save"));
    let run = bin()
        .args(job_args(&model, &data, &out, &save, steps()))
        .args(["--save_gguf", "--quantization", "q8_0"])
        .args(["--push_model", "--push_gguf", "--hub_path", "me/tiny"])
        .args(["--hub_token", SECRET])
        .env("HF_ENDPOINT", hub.endpoint())
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    let text = output_text(&run);
    assert!(run.status.success(), "{text}");
    assert!(
        !text.contains(SECRET),
        "the token leaked into the output:\n{text}"
    );
    let repo = hub.repo("me/tiny");
    assert!(assert_pushed(&save, &repo, |n| !is_gguf(n)) >= 3);
    assert_eq!(assert_pushed(&save, &repo, is_gguf), 2);
    let requests = hub.requests();
    let commits: Vec<_> = requests
        .iter()
        .filter(|r| r["path"].as_str().unwrap().contains("/commit/"))
        .collect();
    assert_eq!(commits.len(), 1, "{requests:?}");
    // The adapter and the GGUF are LFS objects; their storage URLs never get the token.
    let storage: Vec<_> = requests
        .iter()
        .filter(|r| r["path"].as_str().unwrap().starts_with("/_storage/"))
        .collect();
    assert!(!storage.is_empty(), "{requests:?}");
    assert!(storage.iter().all(|r| r["auth"] == false), "{requests:?}");
}

#[test]
fn a_refused_push_keeps_the_saves_and_says_how_to_retry() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(hub) = fake_hub(&tmp.path().join("hub"), "another-token") else {
        return;
    };
    let (model, data) = fixture(tmp.path());
    let (out, save) = (tmp.path().join("out"), tmp.path().join("save"));
    let run = bin()
        .args(job_args(&model, &data, &out, &save, steps()))
        .args(["--push_model", "--hub_path", "me/tiny"])
        .env("HF_TOKEN", SECRET)
        .env("HF_ENDPOINT", hub.endpoint())
        .output()
        .unwrap();
    let text = output_text(&run);
    assert_eq!(run.status.code(), Some(1), "{text}");
    assert!(
        !text.contains(SECRET),
        "the token leaked into the output:\n{text}"
    );
    assert!(
        text.contains("refused the token") && text.contains("ferrotune export --adapter"),
        "{text}"
    );
    assert!(save.join("adapter_model.safetensors").is_file());
    assert!(!hub
        .repo("me/tiny")
        .join("adapter_model.safetensors")
        .exists());

    // The retry the message names pushes the kept save without retraining.
    let Some(good) = fake_hub(&tmp.path().join("hub2"), SECRET) else {
        return;
    };
    let again = tmp.path().join("again");
    let export = bin()
        .args(["export", "--adapter", save.to_str().unwrap()])
        .args(["--base", model.to_str().unwrap()])
        .args([
            "--save_method",
            "lora",
            "--save_path",
            again.to_str().unwrap(),
        ])
        .args(["--push_model", "--hub_path", "me/tiny"])
        .env("HF_TOKEN", SECRET)
        .env("HF_ENDPOINT", good.endpoint())
        .output()
        .unwrap();
    let text = output_text(&export);
    assert!(export.status.success(), "{text}");
    assert!(!text.contains(SECRET), "{text}");
    assert!(assert_pushed(&again, &good.repo("me/tiny"), |_| true) >= 3);
}

#[test]
fn pushes_without_a_token_or_to_a_dead_endpoint_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = fixture(tmp.path());
    let (out, save) = (tmp.path().join("out"), tmp.path().join("save"));
    let run = bin()
        .args(job_args(&model, &data, &out, &save, steps()))
        .args(["--push_model", "--hub_path", "me/tiny"])
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2), "{}", output_text(&run));
    assert!(output_text(&run).contains("--hub_token or set HF_TOKEN"));
    assert!(
        !save.exists(),
        "nothing is trained before the flags are checked"
    );

    // A port nobody listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let run = bin()
        .args(job_args(&model, &data, &out, &save, steps()))
        .args([
            "--push_model",
            "--hub_path",
            "me/tiny",
            "--hub_token",
            SECRET,
        ])
        .env("HF_ENDPOINT", format!("http://127.0.0.1:{port}"))
        .output()
        .unwrap();
    let text = output_text(&run);
    assert_eq!(run.status.code(), Some(1), "{text}");
    assert!(!text.contains(SECRET), "{text}");
    assert!(
        text.contains("create repository") && text.contains("retry"),
        "{text}"
    );
    assert!(save.join("adapter_model.safetensors").is_file());
}
