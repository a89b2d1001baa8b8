//! Training checkpoints (DESIGN.md §3): `OUTPUT_DIR/checkpoint-N/` holding
//!
//! | file | what |
//! |---|---|
//! | `adapter_model.safetensors`, `adapter_config.json`, `README.md` | the PEFT adapter (loadable by `peft`) |
//! | `optimizer.safetensors`, `optimizer.json` | optimizer tensors and scalars (step counts, engine counters) |
//! | `trainer_state.json` | transformers' `TrainerState` (global_step, epoch, log_history, …) |
//! | `training_state.json` | what exact continuation needs: data position, schedule, run identity |
//! | `training_args.json` | the job's resolved flags (secrets redacted) |
//! | `manifest.json` | size and SHA-256 of every file above, written last |
//!
//! A checkpoint is written into a hidden sibling directory and renamed into place
//! ([`atomic`]); it is valid when its manifest verifies ([`manifest`]).

pub mod atomic;
pub mod manifest;
pub mod tensors;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::engine::HostTensor;
use crate::export::adapter::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODEL_CARD};
use manifest::{Manifest, MANIFEST};

pub const OPTIMIZER_TENSORS: &str = "optimizer.safetensors";
pub const OPTIMIZER_SCALARS: &str = "optimizer.json";
pub const TRAINER_STATE: &str = "trainer_state.json";
pub const TRAINING_STATE: &str = "training_state.json";
pub const TRAINING_ARGS: &str = "training_args.json";

/// Files a checkpoint must have to be resumed from.
pub const REQUIRED: [&str; 6] = [
    ADAPTER_WEIGHTS,
    ADAPTER_CONFIG,
    OPTIMIZER_TENSORS,
    OPTIMIZER_SCALARS,
    TRAINER_STATE,
    TRAINING_STATE,
];

const PREFIX: &str = "checkpoint-";

/// Everything one checkpoint holds, already serialised where the format is not ours.
pub struct Snapshot {
    pub global_step: u64,
    pub adapter: Vec<(String, HostTensor)>,
    pub adapter_config: Vec<u8>,
    pub model_card: String,
    pub optimizer_tensors: Vec<(String, HostTensor)>,
    pub optimizer_scalars: Value,
    pub trainer_state: Value,
    pub training_state: Value,
    pub training_args: Value,
}

/// What a resume reads back.
pub struct Loaded {
    pub dir: PathBuf,
    pub adapter: Vec<(String, HostTensor)>,
    pub optimizer_tensors: Vec<(String, HostTensor)>,
    pub optimizer_scalars: Value,
    pub trainer_state: Value,
    pub training_state: Value,
}

pub fn dir_for(output_dir: &Path, global_step: u64) -> PathBuf {
    output_dir.join(format!("{PREFIX}{global_step}"))
}

/// Writes `OUTPUT_DIR/checkpoint-N` atomically (replacing one of the same step).
pub fn save(output_dir: &Path, snapshot: &Snapshot) -> Result<PathBuf> {
    let target = dir_for(output_dir, snapshot.global_step);
    let staged = atomic::StagingDir::create(&target)?;
    staged.write(
        ADAPTER_WEIGHTS,
        &crate::export::adapter::weights_bytes(&snapshot.adapter)?,
    )?;
    crash_point(snapshot.global_step);
    staged.write(ADAPTER_CONFIG, &snapshot.adapter_config)?;
    staged.write(MODEL_CARD, snapshot.model_card.as_bytes())?;
    staged.write(
        OPTIMIZER_TENSORS,
        &tensors::to_bytes(
            &snapshot.optimizer_tensors,
            &[("format", "ferrotune-optimizer")],
        )?,
    )?;
    staged.write(OPTIMIZER_SCALARS, &pretty(&snapshot.optimizer_scalars))?;
    staged.write(TRAINER_STATE, &pretty(&snapshot.trainer_state))?;
    staged.write(TRAINING_STATE, &pretty(&snapshot.training_state))?;
    staged.write(TRAINING_ARGS, &pretty(&snapshot.training_args))?;
    // Last: the manifest is what makes the directory a valid checkpoint.
    let manifest = Manifest::describe(staged.path(), snapshot.global_step)?;
    staged.write(MANIFEST, &pretty(&serde_json::to_value(&manifest)?))?;
    staged.commit()
}

/// Test hook for crash-safety tests: `FERROTUNE_CRASH_IN_SAVE=N` aborts the process (as a kill
/// would) while checkpoint-N is half written.
fn crash_point(global_step: u64) {
    let target = std::env::var("FERROTUNE_CRASH_IN_SAVE")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    if target == Some(global_step) {
        eprintln!("FERROTUNE_CRASH_IN_SAVE={global_step}: aborting mid-save");
        std::process::abort();
    }
}

fn pretty(value: &Value) -> Vec<u8> {
    let mut text = serde_json::to_string_pretty(value).expect("JSON values serialise");
    text.push('\n');
    text.into_bytes()
}

/// The step N of a directory named exactly `checkpoint-N` (digits only: no sign, no suffix).
pub fn step_of(dir_name: &str) -> Option<u64> {
    let digits = dir_name.strip_prefix(PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `checkpoint-N` directories in `output_dir`, oldest (lowest N) first.
pub fn list(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(output_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot list", output_dir.display())),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        let step = entry.file_name().to_str().and_then(step_of);
        if let (Some(step), true) = (step, entry.file_type()?.is_dir()) {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Checks a checkpoint directory against its manifest.
pub fn verify(dir: &Path) -> Result<Manifest> {
    let manifest = Manifest::read(dir)?;
    manifest.verify(dir, &REQUIRED)?;
    Ok(manifest)
}

/// `--resume`: the newest checkpoint in `output_dir` whose manifest verifies. Each newer one
/// that does not is named in a warning with the reason; `None` when there is no valid one.
pub fn newest_valid(output_dir: &Path) -> Result<Option<PathBuf>> {
    for (_, dir) in list(output_dir)?.into_iter().rev() {
        match verify(&dir) {
            Ok(_) => return Ok(Some(dir)),
            Err(why) => tracing::warn!(
                "{} is not a usable checkpoint ({why:#}); trying an older one",
                dir.display()
            ),
        }
    }
    Ok(None)
}

/// Reads a verified checkpoint.
pub fn load(dir: &Path) -> Result<Loaded> {
    verify(dir).with_context(|| format!("{} is not a valid checkpoint", dir.display()))?;
    let json = |name: &str| -> Result<Value> {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
    };
    Ok(Loaded {
        dir: dir.to_path_buf(),
        adapter: tensors::read(&dir.join(ADAPTER_WEIGHTS))?,
        optimizer_tensors: tensors::read(&dir.join(OPTIMIZER_TENSORS))?,
        optimizer_scalars: json(OPTIMIZER_SCALARS)?,
        trainer_state: json(TRAINER_STATE)?,
        training_state: json(TRAINING_STATE)?,
    })
}

/// `--save_total_limit`: deletes the oldest checkpoints beyond `limit`, never `keep` (the one
/// just written). Returns what it deleted.
pub fn rotate(output_dir: &Path, limit: usize, keep: &Path) -> Result<Vec<PathBuf>> {
    let all = list(output_dir)?;
    let excess = all.len().saturating_sub(limit);
    let mut removed = Vec::new();
    for (_, dir) in all.into_iter().filter(|(_, d)| d != keep).take(excess) {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("{}: cannot delete old checkpoint", dir.display()))?;
        removed.push(dir);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::HostData;

    fn snapshot(step: u64) -> Snapshot {
        let t = |v: Vec<f32>| HostTensor {
            shape: vec![v.len()],
            data: HostData::F32(v),
        };
        Snapshot {
            global_step: step,
            adapter: vec![(
                "base_model.model.x.lora_A.weight".into(),
                t(vec![step as f32, 2.0]),
            )],
            adapter_config: b"{}".to_vec(),
            model_card: "card".into(),
            optimizer_tensors: vec![("x.exp_avg".into(), t(vec![0.5]))],
            optimizer_scalars: serde_json::json!({"optimizer": "adamw"}),
            trainer_state: serde_json::json!({"global_step": step}),
            training_state: serde_json::json!({"global_step": step}),
            training_args: serde_json::json!({}),
        }
    }

    #[test]
    fn saved_checkpoint_verifies_loads_and_rotates() {
        let out = tempfile::tempdir().unwrap();
        for step in [2, 4, 6] {
            save(out.path(), &snapshot(step)).unwrap();
        }
        let dirs: Vec<u64> = list(out.path()).unwrap().iter().map(|(s, _)| *s).collect();
        assert_eq!(dirs, [2, 4, 6]);
        let loaded = load(&dir_for(out.path(), 4)).unwrap();
        assert_eq!(loaded.adapter[0].1.data, HostData::F32(vec![4.0, 2.0]));
        assert_eq!(loaded.trainer_state["global_step"], 4);
        let removed = rotate(out.path(), 2, &dir_for(out.path(), 6)).unwrap();
        assert_eq!(removed, vec![dir_for(out.path(), 2)]);
        assert_eq!(list(out.path()).unwrap().len(), 2);
    }

    #[test]
    fn resume_falls_back_past_damaged_and_unfinished_checkpoints() {
        let out = tempfile::tempdir().unwrap();
        for step in [2, 4, 6] {
            save(out.path(), &snapshot(step)).unwrap();
        }
        // 6: a file changed after the save; 4: the manifest never got written.
        std::fs::write(
            dir_for(out.path(), 6).join(TRAINER_STATE),
            b"{\"global_step\": 7}",
        )
        .unwrap();
        std::fs::remove_file(dir_for(out.path(), 4).join(MANIFEST)).unwrap();
        assert_eq!(
            newest_valid(out.path()).unwrap(),
            Some(dir_for(out.path(), 2))
        );
        let err = load(&dir_for(out.path(), 6)).err().unwrap();
        assert!(format!("{err:#}").contains("trainer_state.json"), "{err:#}");
        std::fs::remove_dir_all(dir_for(out.path(), 2)).unwrap();
        assert_eq!(newest_valid(out.path()).unwrap(), None);
        assert_eq!(newest_valid(&out.path().join("missing")).unwrap(), None);
    }
}
