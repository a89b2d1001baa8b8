//! `ferrotune export`: the saves of `--save_model`/`--save_gguf` from an existing adapter or
//! checkpoint, without training.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::hf_save::DEFAULT_MAX_SHARD_BYTES;
use super::run::{model_name_of, run_exports, ExportRequest};
use super::{publish, push};
use crate::cli::args::ExportArgs;
use crate::cli::UsageError;
use crate::plugin::publish_host::ArtefactKind;
use crate::plugin::PluginLimits;

pub fn run(args: ExportArgs) -> Result<()> {
    let (flag, adapter_dir) = match (&args.adapter, &args.checkpoint) {
        (Some(dir), None) => ("--adapter", dir.clone()),
        (None, Some(dir)) => ("--checkpoint", dir.clone()),
        _ => {
            return Err(UsageError::new(
                "ferrotune export: pass exactly one of --adapter DIR or --checkpoint DIR",
            )
            .into())
        }
    };
    if !adapter_dir.join("adapter_config.json").is_file() {
        return Err(UsageError::new(format!(
            "{flag} {}: no adapter_config.json there; pass a PEFT adapter directory or an OUTPUT_DIR/checkpoint-N",
            adapter_dir.display()
        ))
        .into());
    }
    if args.save_method.is_none() && !args.save_gguf {
        return Err(UsageError::new("ferrotune export: nothing to do; pass --save_method merged_16bit|merged_4bit|lora and/or --save_gguf").into());
    }
    let flags = &args.push;
    let push_token = if flags.any() {
        Some(flags.check(args.save_method.is_some(), args.save_gguf)?)
    } else {
        None
    };
    let publish_plan = publish::check(flags, args.save_method.is_some() || args.save_gguf)?;
    let base_name = match &args.base {
        Some(base) => base.clone(),
        None => base_from_adapter(&adapter_dir)?,
    };
    let base_dir: PathBuf = crate::model::resolve::resolve_model(&base_name)
        .map_err(|e| UsageError::new(format!("--base {base_name}: {e:#}")))?;
    let max_seq_length = args
        .max_seq_length
        .or_else(|| trained_max_seq_length(&adapter_dir));
    let request = ExportRequest {
        base_dir,
        adapter_dir,
        save_method: args.save_method,
        gguf_presets: if args.save_gguf {
            args.quantization.clone()
        } else {
            Vec::new()
        },
        save_path: args.save_path.clone(),
        name: model_name_of(&base_name),
        max_shard_bytes: args
            .max_shard_size_mb
            .map_or(DEFAULT_MAX_SHARD_BYTES, |mb| mb * 1_000_000),
        max_seq_length,
    };
    let written = run_exports(&request)?;
    for file in &written {
        println!("{}", file.display());
    }
    // GGUF alone (no --save_method) writes no model files, so the kind is not used then.
    let kind = args
        .save_method
        .map_or(ArtefactKind::MergedModel, push::model_kind);
    // Re-running the same command pushes and publishes again (the export is deterministic).
    let retry = "the same ferrotune export command again";
    if let Some(token) = push_token {
        push::push(
            flags,
            token,
            PluginLimits::default(),
            &args.save_path,
            &written,
            kind,
            retry,
        )?;
    }
    if let Some(plan) = &publish_plan {
        publish::publish(
            plan,
            PluginLimits::default(),
            &args.save_path,
            &written,
            kind,
            retry,
        )?;
    }
    Ok(())
}

fn base_from_adapter(adapter_dir: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(adapter_dir.join("adapter_config.json"))?;
    let config: serde_json::Value = serde_json::from_str(&text)?;
    match config["base_model_name_or_path"].as_str() {
        Some(name) if !name.is_empty() => Ok(name.to_string()),
        _ => Err(UsageError::new(format!(
            "{}/adapter_config.json names no base_model_name_or_path; pass --base MODEL",
            adapter_dir.display()
        ))
        .into()),
    }
}

/// The `--max_seq_length` a checkpoint was trained with (its `training_args.json`), so that its
/// export carries the same RoPE stretch without the flag; `None` for a plain PEFT adapter.
fn trained_max_seq_length(adapter_dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(adapter_dir.join("training_args.json")).ok()?;
    let args: serde_json::Value = serde_json::from_str(&text).ok()?;
    let n = args.get("max_seq_length")?.as_u64()? as usize;
    tracing::info!(
        "--max_seq_length {n} from {}/training_args.json",
        adapter_dir.display()
    );
    Some(n)
}
