//! `ferrotune kelpie job|submit|status|cancel` driven as a user would, against
//! tests/python/fake_kelpie.py (a local stand-in for the Kelpie API that checks the headers).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const KEY: &str = "sk-test-5ecret-key";

/// The fake API's process, killed when dropped (also when an assertion fails first).
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn fake_kelpie() -> (Server, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/fake_kelpie.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args([KEY, "my-org", "my-project"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs the fake Kelpie API");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .strip_prefix("PORT ")
        .expect("PORT line")
        .to_string();
    (Server(child), format!("http://127.0.0.1:{port}"))
}

/// Runs the binary with a clean Salad/Kelpie environment plus `env`.
fn ferrotune(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ferrotune"));
    command.args(args);
    for var in [
        "SALAD_API_KEY",
        "SALAD_ORGANIZATION",
        "SALAD_PROJECT",
        "KELPIE_API_URL",
    ] {
        command.env_remove(var);
    }
    command.envs(env.iter().copied());
    command.output().unwrap()
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const TRAINING: &[&str] = &[
    "--model_name",
    "unsloth/llama-3-8b",
    "--max_steps",
    "1200",
    "--output_dir",
    "/opt/ckpt",
    "--save_model",
    "--save_path",
    "/opt/final",
];

fn job_json(extra: &[&str], training: &[&str]) -> Output {
    let mut args = vec![
        "kelpie",
        "job",
        "--container_group_id",
        "cg-1",
        "--bucket",
        "b",
    ];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(training);
    ferrotune(&args, &[])
}

#[test]
fn job_json_carries_the_training_args_and_syncs_their_directories() {
    let job = json_of(&job_json(&["--max_failures", "5"], TRAINING));
    assert_eq!(job["command"], "ferrotune");
    let arguments: Vec<&str> = job["arguments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().expect("arguments are strings"))
        .collect();
    assert_eq!(arguments, TRAINING);
    assert_eq!(job["environment"], serde_json::json!({}));
    assert_eq!(job["max_failures"], 5);
    assert_eq!(job["heartbeat_interval"], 30);
    assert_eq!(job["container_group_id"], "cg-1");
    let sync = &job["sync"];
    let prefix = sync["before"][0]["prefix"].as_str().unwrap();
    assert!(prefix.starts_with("ferrotune/jobs/") && prefix.ends_with("/checkpoints/"));
    for (list, local, direction) in [
        ("before", "/opt/ckpt/", "download"),
        ("during", "/opt/ckpt/", "upload"),
        ("after", "/opt/final/", "upload"),
    ] {
        let entries = sync[list].as_array().unwrap();
        assert_eq!(entries.len(), 1, "{list}");
        assert_eq!(entries[0]["bucket"], "b");
        assert_eq!(entries[0]["local_path"], local, "{list}");
        assert_eq!(entries[0]["direction"], direction, "{list}");
    }
    assert_eq!(sync["during"][0]["prefix"], prefix);
    let job_root = prefix.strip_suffix("checkpoints/").unwrap();
    assert_eq!(sync["after"][0]["prefix"], format!("{job_root}outputs/"));

    // Two jobs made back to back never share a prefix.
    let again = json_of(&job_json(&[], TRAINING));
    assert_ne!(again["sync"]["before"][0]["prefix"], prefix);

    // The real defaults, and a given prefix.
    let defaults = json_of(&job_json(&["--prefix", "/runs/a/"], &["--model_name", "m"]));
    assert_eq!(
        defaults["sync"]["before"][0]["local_path"],
        "/opt/checkpoints/"
    );
    assert_eq!(
        defaults["sync"]["before"][0]["prefix"],
        "runs/a/checkpoints/"
    );
    assert_eq!(defaults["sync"]["after"][0]["local_path"], "/opt/outputs/");
}

#[test]
fn a_bad_training_flag_is_refused_before_a_job_is_made() {
    let out = job_json(&[], &["--model_name", "m", "--learnin_rate", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = stderr(&out);
    assert!(
        err.contains("--learnin_rate") && err.lines().count() == 1,
        "{err}"
    );

    // No training args at all: the missing part is named.
    let out = ferrotune(
        &[
            "kelpie",
            "job",
            "--container_group_id",
            "c",
            "--bucket",
            "b",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("TRAINING ARGS"), "{}", stderr(&out));

    let out = job_json(&[], &["--output_dir", "ckpt"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("absolute"), "{}", stderr(&out));
}

#[test]
fn submit_status_and_cancel_talk_to_the_api() {
    let (_server, url) = fake_kelpie();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("job.json");
    std::fs::write(&file, job_json(&[], TRAINING).stdout).unwrap();
    let file = file.to_str().unwrap();
    let env = [
        ("KELPIE_API_URL", url.as_str()),
        ("SALAD_API_KEY", KEY),
        ("SALAD_ORGANIZATION", "my-org"),
    ];
    let api = |args: &[&str]| {
        let mut all = vec!["kelpie"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--project", "my-project"]);
        ferrotune(&all, &env)
    };

    let created = json_of(&api(&["submit", file]));
    let id = created["id"].as_str().expect("the created job has an id");
    assert_eq!(created["status"], "pending");
    assert_eq!(created["command"], "ferrotune");

    let status = json_of(&api(&["status", id]));
    assert_eq!(status["id"], id);
    assert_eq!(
        status["arguments"].as_array().unwrap().len(),
        TRAINING.len()
    );

    let cancelled = json_of(&api(&["cancel", id]));
    assert_eq!(cancelled["status"], "canceled");

    let missing = api(&["status", "no-such-job"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("404") && stderr(&missing).contains("Job not found"));

    // A wrong key: one clear line with the status and the server's message, never the key.
    let wrong_key = "sk-wrong-key-do-not-print";
    let out = ferrotune(
        &[
            "kelpie",
            "status",
            id,
            "--organization",
            "my-org",
            "--project",
            "my-project",
        ],
        &[("KELPIE_API_URL", &url), ("SALAD_API_KEY", wrong_key)],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("401") && err.contains("Unauthorized"), "{err}");
    assert!(err.contains("SALAD_API_KEY"), "{err}");
    let all = format!("{err}{}", String::from_utf8_lossy(&out.stdout));
    assert!(!all.contains(wrong_key) && !all.contains(KEY), "{all}");

    // No key at all: bad input naming the variable.
    let out = ferrotune(
        &[
            "kelpie",
            "status",
            id,
            "--organization",
            "o",
            "--project",
            "p",
        ],
        &[("KELPIE_API_URL", &url)],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("SALAD_API_KEY"), "{}", stderr(&out));
}
