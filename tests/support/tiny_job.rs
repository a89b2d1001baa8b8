//! A tiny training job for end-to-end tests of sync: a random Llama small enough that a step
//! takes milliseconds on the cpu engine, the demo dataset, and helpers to read back what a run
//! left (per-step losses, checkpoints in a directory or a store).

use std::path::{Path, PathBuf};
use std::process::Command;

use ferrotune::model::tiny::{write_tiny_chat_model, TinySpec};
use ferrotune::storage::ObjectStore;

/// The binary with logs at info (sync at debug, so tests can see each upload).
pub fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrotune"));
    cmd.env("FERROTUNE_LOG", "info,ferrotune::sync=debug")
        .env_remove("KELPIE_JOB_ID")
        .env_remove("FERROTUNE_CRASH_IN_SAVE");
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// A tiny model + tokenizer and 40 rows of the demo dataset in `dir`.
pub fn fixture(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("model");
    let texts: Vec<&str> = ferrotune::demo::DATASET.lines().collect();
    write_tiny_chat_model(&model, &texts, 320, 512, TinySpec::default(), 1).unwrap();
    let data = dir.join("train.jsonl");
    std::fs::write(&data, texts[..40].join("\n") + "\n").unwrap();
    (model, data)
}

/// Shape of a tiny run.
#[derive(Debug, Clone, Copy)]
pub struct Steps {
    pub max_steps: u64,
    pub save_steps: u64,
    pub save_total_limit: u64,
}

/// Flags of a tiny LoRA job writing checkpoints to `out` and the final adapter to `save`.
pub fn job_args(model: &Path, data: &Path, out: &Path, save: &Path, steps: Steps) -> Vec<String> {
    let s = |p: &Path| p.to_string_lossy().into_owned();
    [
        "--model_name",
        &s(model),
        "--dataset",
        &s(data),
        "--output_dir",
        &s(out),
        "--save_path",
        &s(save),
        "--save_model",
        "--save_method",
        "lora",
        "--device",
        "cpu",
        "--max_seq_length",
        "128",
        "--r",
        "4",
        "--lora_alpha",
        "8",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "1",
        "--max_steps",
        &steps.max_steps.to_string(),
        "--save_steps",
        &steps.save_steps.to_string(),
        "--save_total_limit",
        &steps.save_total_limit.to_string(),
        "--logging_steps",
        "1",
        "--learning_rate",
        "5e-3",
        "--report_to",
        "none",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

/// (step, loss bits) of every logged step, from the run's final `trainer_state.json`.
pub fn losses(out: &Path) -> Vec<(u64, u64)> {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("trainer_state.json")).unwrap()).unwrap();
    state["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["step"].as_u64()?, e.get("loss")?.as_f64()?.to_bits())))
        .collect()
}

/// `checkpoint-N` steps under `prefix/` in a store, each with whether its manifest is there.
pub fn remote_checkpoints(store: &dyn ObjectStore, prefix: &str) -> Vec<(u64, bool)> {
    let mut found = std::collections::BTreeMap::<u64, bool>::new();
    for object in store.list(&format!("{prefix}/")).unwrap() {
        let rest = &object.key[prefix.len() + 1..];
        let Some((dir, file)) = rest.split_once('/') else {
            continue;
        };
        if let Some(step) = dir.strip_prefix("checkpoint-").and_then(|n| n.parse().ok()) {
            *found.entry(step).or_default() |= file == "manifest.json";
        }
    }
    found.into_iter().collect()
}

/// Downloads remote `prefix/checkpoint-<step>` into `into` and checks it against its manifest
/// with the checkpoint loader's own verification; panics naming what is wrong.
pub fn verify_remote_checkpoint(store: &dyn ObjectStore, prefix: &str, step: u64, into: &Path) {
    let base = format!("{prefix}/checkpoint-{step}/");
    let dir = into.join(format!("checkpoint-{step}"));
    for object in store.list(&base).unwrap() {
        let rel = &object.key[base.len()..];
        store.get_file(&object.key, &dir.join(rel)).unwrap();
    }
    if let Err(e) = ferrotune::checkpoint::verify(&dir) {
        panic!("remote checkpoint-{step} does not verify: {e:#}");
    }
}

/// Every file under `dir`, relative, sorted.
pub fn files_under(dir: &Path) -> Vec<String> {
    ferrotune::sync::manifest::files_under(dir).unwrap()
}

/// The final artefacts (`save`, with the adapter) stored under `outputs/` equal the local ones;
/// downloads go below `scratch`.
pub fn assert_outputs_stored(store: &dyn ObjectStore, save: &Path, scratch: &Path) {
    let local = files_under(save);
    assert!(
        local.contains(&"adapter_model.safetensors".to_string()),
        "{local:?}"
    );
    for file in local {
        let got = scratch.join("outputs-check").join(&file);
        store.get_file(&format!("outputs/{file}"), &got).unwrap();
        assert_eq!(
            std::fs::read(&got).unwrap(),
            std::fs::read(save.join(&file)).unwrap(),
            "outputs/{file}"
        );
    }
}
