//! `sync-sparse`, an example sync policy: upload only checkpoints whose step is a multiple of
//! `upload_every_steps` (saving often locally, paying for storage less often), keep the newest
//! `keep_last` of them remotely, and at the end of the run upload the newest checkpoint if it was
//! held back, then the final artefacts (those only when the run completed). With `--resume` it
//! fetches the newest valid remote checkpoint before training, as `mirror` does.
//!
//! ```sh
//! ferrotune … --save_steps 50 --resume \
//!   --sync sync_sparse.wasm \
//!   --sync_config '{"storage": "s3://bucket/jobs/{job_id}", "upload_every_steps": 500, "keep_last": 2}'
//! ```

use ferrotune_plugin_sdk::sync::{Action, Checkpoint, Event, RunOutcome, SyncPolicy};
use ferrotune_plugin_sdk::{export_sync_policy, info};
use serde::Deserialize;

/// The policy's keys of `--sync_config` (the host takes `storage` and `final_timeout_s`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Upload `checkpoint-N` only when N is a multiple of this (required, >= 1).
    pub upload_every_steps: u64,
    /// Remote checkpoints kept (newest complete ones); absent: keep all.
    #[serde(default)]
    pub keep_last: Option<u32>,
    #[serde(default = "checkpoints")]
    pub checkpoints_prefix: String,
    #[serde(default = "outputs")]
    pub outputs_prefix: String,
}

fn checkpoints() -> String {
    "checkpoints".into()
}
fn outputs() -> String {
    "outputs".into()
}

pub struct Sparse {
    config: Config,
    /// The newest checkpoint saved but not uploaded, while it still exists locally.
    held_back: Option<Checkpoint>,
}

impl Sparse {
    fn upload(&self, checkpoint: &Checkpoint) -> Vec<Action> {
        let mut actions = checkpoint.upload_all(&self.config.checkpoints_prefix);
        if let Some(count) = self.config.keep_last {
            actions.push(Action::KeepLast {
                prefix: self.config.checkpoints_prefix.clone(),
                count,
            });
        }
        actions
    }
}

impl SyncPolicy for Sparse {
    const NAME: &'static str = "sync-sparse";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "uploads every k-th checkpoint, keeps the last N remotely, final artefacts on success";
    const CONFIG_SCHEMA: Option<&'static str> = Some(
        r#"{"type":"object","required":["upload_every_steps"],"additionalProperties":false,"properties":{"upload_every_steps":{"type":"integer","minimum":1},"keep_last":{"type":"integer","minimum":1},"checkpoints_prefix":{"type":"string"},"outputs_prefix":{"type":"string"}}}"#,
    );

    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.upload_every_steps == 0 {
            return Err("upload_every_steps must be >= 1".into());
        }
        if config.keep_last == Some(0) {
            return Err("keep_last must be >= 1 (leave it out to keep every checkpoint)".into());
        }
        if config.checkpoints_prefix == config.outputs_prefix {
            return Err("checkpoints_prefix and outputs_prefix must differ".into());
        }
        Ok(Sparse {
            config,
            held_back: None,
        })
    }

    fn on_event(&mut self, event: Event) -> Result<Vec<Action>, String> {
        Ok(match event {
            Event::RunStarting(start) if start.resume => vec![Action::DownloadLatestValid {
                prefix: self.config.checkpoints_prefix.clone(),
            }],
            Event::RunStarting(_) => Vec::new(),
            Event::CheckpointSaved(checkpoint) => {
                if checkpoint
                    .step
                    .is_multiple_of(self.config.upload_every_steps)
                {
                    self.held_back = None;
                    self.upload(&checkpoint)
                } else {
                    info!(
                        "holding back {} (not a multiple of {})",
                        checkpoint.name(),
                        self.config.upload_every_steps
                    );
                    self.held_back = Some(checkpoint);
                    Vec::new()
                }
            }
            Event::CheckpointDeleted(step) => {
                if self.held_back.as_ref().is_some_and(|c| c.step == step) {
                    self.held_back = None;
                }
                Vec::new()
            }
            Event::RunFinished { outcome, artefacts } => {
                // The newest state is worth storing either way: a failed run is retried
                // elsewhere and resumes from it.
                let mut actions = match self.held_back.take() {
                    Some(newest) => {
                        info!(
                            "uploading the held-back {} at the end of the run",
                            newest.name()
                        );
                        self.upload(&newest)
                    }
                    None => Vec::new(),
                };
                if outcome == RunOutcome::Completed {
                    for artefact in &artefacts {
                        actions.extend(artefact.upload_all(&self.config.outputs_prefix));
                    }
                }
                actions
            }
        })
    }
}

export_sync_policy!(Sparse);

#[cfg(test)]
mod tests {
    use super::*;
    use ferrotune_plugin_sdk::sync::{
        Artefact, ArtefactKind, FileInfo, RunStart, SyncHarness, MANIFEST,
    };
    use serde_json::json;

    fn checkpoint(step: u64) -> Checkpoint {
        let file = |path: &str| FileInfo {
            path: path.into(),
            size: 3,
            sha256: Some("ab".into()),
        };
        Checkpoint {
            step,
            dir: format!("/o/checkpoint-{step}"),
            files: vec![file("adapter_model.safetensors"), file(MANIFEST)],
        }
    }

    fn keys(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                Action::Upload { key, .. } => key.clone(),
                Action::KeepLast { count, .. } => format!("keep {count}"),
                Action::DownloadLatestValid { prefix } => format!("download {prefix}"),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    fn harness() -> SyncHarness<Sparse> {
        SyncHarness::new(
            json!({"upload_every_steps": 4, "keep_last": 2, "checkpoints_prefix": "ck"}),
        )
        .unwrap()
    }

    #[test]
    fn uploads_every_kth_step_manifest_last_then_rotates() {
        let mut h = harness();
        assert!(h
            .event(Event::CheckpointSaved(checkpoint(2)))
            .unwrap()
            .is_empty());
        assert_eq!(
            keys(&h.event(Event::CheckpointSaved(checkpoint(4))).unwrap()),
            [
                "ck/checkpoint-4/adapter_model.safetensors",
                "ck/checkpoint-4/manifest.json",
                "keep 2"
            ]
        );
    }

    #[test]
    fn the_held_back_newest_checkpoint_goes_up_at_the_end_then_the_artefacts() {
        let mut h = harness();
        h.event(Event::CheckpointSaved(checkpoint(4))).unwrap();
        h.event(Event::CheckpointSaved(checkpoint(5))).unwrap();
        let artefacts = vec![Artefact {
            kind: ArtefactKind::Adapter,
            path: "/final".into(),
            files: vec![FileInfo {
                path: "adapter_model.safetensors".into(),
                size: 1,
                sha256: None,
            }],
            quantization: None,
        }];
        let done = h
            .event(Event::RunFinished {
                outcome: RunOutcome::Completed,
                artefacts: artefacts.clone(),
            })
            .unwrap();
        assert_eq!(
            keys(&done),
            [
                "ck/checkpoint-5/adapter_model.safetensors",
                "ck/checkpoint-5/manifest.json",
                "keep 2",
                "outputs/adapter_model.safetensors"
            ]
        );
        // A failed run stores its newest checkpoint but no artefacts.
        let mut h = harness();
        h.event(Event::CheckpointSaved(checkpoint(6))).unwrap();
        let failed = h
            .event(Event::RunFinished {
                outcome: RunOutcome::Failed,
                artefacts,
            })
            .unwrap();
        assert_eq!(keys(&failed).len(), 3, "{failed:?}");
    }

    #[test]
    fn a_held_back_checkpoint_rotated_away_locally_is_forgotten() {
        let mut h = harness();
        h.event(Event::CheckpointSaved(checkpoint(5))).unwrap();
        h.event(Event::CheckpointDeleted(5)).unwrap();
        let done = h
            .event(Event::RunFinished {
                outcome: RunOutcome::Failed,
                artefacts: Vec::new(),
            })
            .unwrap();
        assert!(done.is_empty(), "{done:?}");
    }

    #[test]
    fn resume_downloads_the_newest_valid_checkpoint() {
        let start = |resume| {
            Event::RunStarting(RunStart {
                output_dir: "/o".into(),
                save_path: "/s".into(),
                resume,
                local_step: None,
                save_total_limit: None,
            })
        };
        let mut h = harness();
        assert_eq!(keys(&h.event(start(true)).unwrap()), ["download ck"]);
        assert!(h.event(start(false)).unwrap().is_empty());
    }

    #[test]
    fn bad_config_names_the_key() {
        for (config, needle) in [
            (json!({}), "upload_every_steps"),
            (json!({"upload_every_steps": 0}), "upload_every_steps"),
            (
                json!({"upload_every_steps": 1, "keep_last": 0}),
                "keep_last",
            ),
            (json!({"upload_every_steps": 1, "bucket": "x"}), "bucket"),
        ] {
            let err = SyncHarness::<Sparse>::new(config).err().unwrap();
            assert!(err.contains(needle), "{err}");
        }
    }
}
