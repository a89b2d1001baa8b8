//! The parsed flags given their meaning: aliases normalised, cross-flag rules checked, and the
//! list of requested features that this build cannot run yet (which fail loudly, never silently).

use std::path::Path;

use crate::cli::choices::Dtype;
use crate::cli::{TrainArgs, UsageError};

/// A validated training job. Field names are the flag names; `--dry_run` prints it as JSON.
pub type JobConfig = TrainArgs;

/// The projections LoRA can target, in PEFT's names.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The formatters built into the binary.
pub const BUILTIN_FORMATTERS: [&str; 4] = ["alpaca", "chat", "text", "prompt-completion"];

/// Normalises and cross-checks parsed flags. `explicit(id)` says whether a flag was given (on the
/// command line or in `--config`) rather than defaulted.
pub fn resolve(
    mut job: TrainArgs,
    explicit: impl Fn(&str) -> bool,
) -> Result<JobConfig, UsageError> {
    job.model.dtype = match &job.model.dtype {
        None => None,
        Some(text) => Dtype::parse_flag(text)
            .map_err(UsageError::new)?
            .map(|d| d.as_str().to_string()),
    };
    job.lora.target_modules = normalise_target_modules(&job.lora.target_modules)?;
    resolve_step_budget(&mut job, &explicit);

    let data = &job.data;
    if data.stride >= data.chunk_size {
        return Err(UsageError::new(format!(
            "--stride ({}) must be smaller than --chunk_size ({}); lower --stride or raise --chunk_size",
            data.stride, data.chunk_size
        )));
    }
    if let Some(dir) = &job.checkpoint.resume_from_checkpoint {
        if !dir.is_dir() {
            return Err(UsageError::new(format!(
                "--resume_from_checkpoint {}: no such directory; pass an existing OUTPUT_DIR/checkpoint-N \
                 or use --resume to pick the newest valid one",
                dir.display()
            )));
        }
    }
    check_report_to(&job.reporting.report_to)?;
    check_plugin_choice("--formatter", &job.plugins.formatter, &BUILTIN_FORMATTERS)?;
    for (flag, value) in [
        ("--formatter_config", &job.plugins.formatter_config),
        ("--sync_config", &job.plugins.sync_config),
        ("--loftq_config", &job.lora.loftq_config),
    ] {
        if let Some(text) = value {
            json_or_file(flag, text)?;
        }
    }
    crate::sync::SyncSettings::from_flags(
        job.plugins.sync.as_deref(),
        job.plugins.sync_to.as_deref(),
        job.plugins.sync_config.as_deref(),
    )?;
    if let Some(file) = &job.data.raw_text_file {
        if !file.is_file() {
            return Err(UsageError::new(format!(
                "--raw_text_file {}: no such file; pass a readable text file",
                file.display()
            )));
        }
    }
    Ok(job)
}

/// `q` or `q_proj` → `q_proj`; `all-linear` → all seven projections.
fn normalise_target_modules(given: &[String]) -> Result<Vec<String>, UsageError> {
    let mut out: Vec<String> = Vec::new();
    for raw in given.iter().flat_map(|s| s.split_whitespace()) {
        let names: Vec<&str> = if raw == "all-linear" || raw == "all_linear" {
            PROJECTIONS.to_vec()
        } else {
            let full = if raw.ends_with("_proj") {
                raw.to_string()
            } else {
                format!("{raw}_proj")
            };
            let known = PROJECTIONS.iter().find(|p| **p == full).ok_or_else(|| {
                UsageError::new(format!(
                    "--target_modules: unknown module {raw:?}; use any of q,k,v,o,gate,up,down \
                     (with or without _proj) or all-linear"
                ))
            })?;
            vec![*known]
        };
        for name in names {
            if !out.iter().any(|o| o == name) {
                out.push(name.to_string());
            }
        }
    }
    if out.is_empty() {
        return Err(UsageError::new(
            "--target_modules is empty; name at least one of q,k,v,o,gate,up,down",
        ));
    }
    Ok(out)
}

/// `--max_steps` wins (as in transformers) unless only `--num_train_epochs` was given; a step
/// budget of -1 means "train for num_train_epochs" (3 when unset, transformers' default).
fn resolve_step_budget(job: &mut TrainArgs, explicit: &impl Fn(&str) -> bool) {
    let t = &mut job.training;
    if t.num_train_epochs.is_some() && explicit("num_train_epochs") && !explicit("max_steps") {
        t.max_steps = -1;
    }
    if t.max_steps <= 0 {
        t.max_steps = -1;
        t.num_train_epochs.get_or_insert(3.0);
    }
}

fn check_report_to(report_to: &str) -> Result<(), UsageError> {
    match report_to {
        "tensorboard" | "none" | "all" => Ok(()),
        other => Err(UsageError::new(format!(
            "--report_to {other}: ferrotune reports to tensorboard event files only; \
             use --report_to tensorboard or none"
        ))),
    }
}

fn check_plugin_choice(flag: &str, value: &str, builtins: &[&str]) -> Result<(), UsageError> {
    if builtins.contains(&value) {
        return Ok(());
    }
    let path = Path::new(value);
    if path.extension().is_some_and(|e| e == "wasm") {
        if path.is_file() {
            return Ok(());
        }
        return Err(UsageError::new(format!(
            "{flag} {value}: no such file; pass an existing .wasm component"
        )));
    }
    Err(UsageError::new(format!(
        "{flag} {value:?}: not a built-in ({}) nor a .wasm path",
        builtins.join(", ")
    )))
}

/// Reads a flag value that is inline JSON or `@file.json`.
pub fn json_or_file(flag: &str, text: &str) -> Result<serde_json::Value, UsageError> {
    let (source, body) = match text.strip_prefix('@') {
        Some(file) => {
            let body = std::fs::read_to_string(file).map_err(|e| {
                UsageError::new(format!(
                    "{flag} @{file}: cannot read it ({e}); pass inline JSON or @existing-file.json"
                ))
            })?;
            (format!("@{file}"), body)
        }
        None => ("value".to_string(), text.to_string()),
    };
    serde_json::from_str(&body)
        .map_err(|e| UsageError::new(format!("{flag} {source}: invalid JSON ({e}); fix the JSON")))
}

/// Features the job asks for that this build cannot run yet, each named with the issue that
/// builds it. Checked before any work starts, so nothing is written for a job that cannot finish.
pub fn unbuilt_features(job: &JobConfig) -> Vec<String> {
    let mut missing = Vec::new();
    let mut need = |on: bool, what: &str, issue: &str| {
        if on {
            missing.push(format!("{what} (not built yet: {issue})"));
        }
    };
    need(
        job.model.load_in_4bit
            && (job.model.device == crate::cli::choices::Device::Cpu || !cfg!(feature = "cuda")),
        "--load_in_4bit on the cpu engine",
        "QLoRA runs on the cuda engine; use --device cuda (or auto) on a GPU build",
    );
    need(
        job.lora.loftq_config.is_some(),
        "--loftq_config",
        "LoftQ initialisation",
    );
    need(job.lora.use_dora, "--use_dora", "DoRA adapters");
    missing
}
