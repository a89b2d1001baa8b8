//! The scalars half of a checkpoint's optimizer state (`optimizer.json`), in one format whichever
//! engine wrote it, so a run checkpointed on the GPU resumes on the CPU and the other way round:
//!
//! ```json
//! { "optimizer": { "optimizer": "adamw", "steps": [...], ... },
//!   "engine": { "forward_passes": 12 } }
//! ```
//!
//! `optimizer` is what [`crate::optim::Optimizer::export_state`] writes (the cuda engine writes
//! the same for its on-device AdamW). `engine.forward_passes` counts training forward passes: the
//! seed of the LoRA-dropout masks, which both engines draw identically (`engine::cpu::dropout`).
//! Checkpoints of engines that drew no masks (older cuda builds) leave it out.

use anyhow::{Context, Result};
use serde_json::{json, Value};

const OPTIMIZER: &str = "optimizer";
const ENGINE: &str = "engine";
const FORWARD_PASSES: &str = "forward_passes";
/// Where checkpoints written before the format was shared kept the cpu engine's pass count.
const LEGACY_CPU_ENGINE: &str = "cpu_engine";

/// What a backend restores from the scalars besides its optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineCounters {
    /// Training forward passes so far, when the writing engine counted them.
    pub forward_passes: Option<u64>,
}

/// The scalars a backend exports: its optimizer's blob plus the engine counters.
pub fn pack(optimizer: Value, counters: EngineCounters) -> Value {
    let mut engine = serde_json::Map::new();
    if let Some(passes) = counters.forward_passes {
        engine.insert(FORWARD_PASSES.into(), passes.into());
    }
    json!({ OPTIMIZER: optimizer, ENGINE: engine })
}

/// Splits what [`pack`] wrote (by any engine) into the optimizer's blob and the counters.
pub fn unpack(scalars: &Value) -> Result<(&Value, EngineCounters)> {
    let optimizer = scalars
        .get(OPTIMIZER)
        .context("optimizer state has no \"optimizer\" scalars")?;
    let passes = |section: &str, key: &str| {
        scalars
            .get(section)
            .and_then(|e| e.get(key))
            .and_then(Value::as_u64)
    };
    let forward_passes =
        passes(ENGINE, FORWARD_PASSES).or_else(|| passes(LEGACY_CPU_ENGINE, "passes"));
    Ok((optimizer, EngineCounters { forward_passes }))
}

/// The pass count a backend continues from. Without a recorded one it restarts at 0: only the
/// dropout masks depend on it, so with `--lora_dropout > 0` the run continues, but not bit for
/// bit as an uninterrupted one would (said in a warning).
pub fn resumed_passes(counters: EngineCounters, lora_dropout: f64) -> u64 {
    if counters.forward_passes.is_none() && lora_dropout > 0.0 {
        tracing::warn!(
            "the checkpoint records no forward-pass count (written by an engine without LoRA \
             dropout): the dropout masks restart, so this run does not repeat an uninterrupted \
             one bit for bit"
        );
    }
    counters.forward_passes.unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_round_trip_and_may_be_absent() {
        let blob = json!({"optimizer": "adamw", "steps": [3]});
        for counters in [
            EngineCounters {
                forward_passes: Some(7),
            },
            EngineCounters::default(),
        ] {
            let packed = pack(blob.clone(), counters);
            let (opt, got) = unpack(&packed).unwrap();
            assert_eq!((opt, got), (&blob, counters));
        }
        // A checkpoint from before the shared format.
        let legacy = json!({"optimizer": blob, "cpu_engine": {"passes": 4}});
        assert_eq!(unpack(&legacy).unwrap().1.forward_passes, Some(4));
        let err = unpack(&json!({"engine": {}})).unwrap_err().to_string();
        assert!(err.contains("\"optimizer\""), "{err}");
    }
}
