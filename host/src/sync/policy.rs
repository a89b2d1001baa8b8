//! Sync policies: events in, actions out (the shape of the `sync` WIT world). A policy never
//! touches files or the network; [`super::execute`] carries out its actions natively.
//!
//! The built-in policy is [`Mirror`]. It is native Rust behind [`SyncPolicy`] because the plugin
//! runtime for the sync world is not in this build yet; a `.wasm` policy will be one more
//! implementation of the same trait.

use std::path::PathBuf;

use crate::storage::key;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    Completed,
    Failed,
    Cancelled,
}

/// Something that happened to the run.
#[derive(Debug, Clone)]
pub enum Event {
    /// The job starts with `--resume`: make the newest remote checkpoint available locally.
    ResumeRequested { output_dir: PathBuf },
    /// `dir` (`OUTPUT_DIR/checkpoint-<step>`) is complete; `files` are its files relative to it.
    CheckpointSaved {
        step: u64,
        dir: PathBuf,
        files: Vec<String>,
    },
    /// The run ended; with `Completed`, `files` are the final artefacts relative to `save_path`.
    RunFinished {
        outcome: RunOutcome,
        save_path: PathBuf,
        files: Vec<String>,
    },
}

/// Something the host should do with storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Upload {
        local: PathBuf,
        key: String,
    },
    Delete {
        key: String,
    },
    /// Delete every checkpoint under `prefix` older than the newest `count` valid ones.
    KeepLast {
        prefix: String,
        count: usize,
    },
    /// Download the newest checkpoint under `prefix` whose manifest verifies into `into`
    /// (as `into/checkpoint-N`), unless `into` already has one as new.
    DownloadLatestValid {
        prefix: String,
        into: PathBuf,
    },
}

/// A sync policy.
pub trait SyncPolicy: Send {
    fn name(&self) -> &str;
    fn on_event(&mut self, event: &Event) -> Result<Vec<Action>, String>;
}

/// Built-in `mirror`: the remote holds what the output directory holds. Checkpoints are
/// uploaded once complete with the manifest last (so a half-uploaded checkpoint is never taken
/// as valid), rotation by `--save_total_limit` is mirrored, and the final artefacts are uploaded
/// only when the run completed (as Kelpie's `sync.after` does on exit 0).
#[derive(Debug, Clone)]
pub struct Mirror {
    /// Key prefix of checkpoints, e.g. `checkpoints`.
    pub checkpoints_prefix: String,
    /// Key prefix of final artefacts, e.g. `outputs`.
    pub outputs_prefix: String,
    /// `--save_total_limit`: remote checkpoints kept.
    pub keep_last: Option<usize>,
}

impl SyncPolicy for Mirror {
    fn name(&self) -> &str {
        "mirror"
    }

    fn on_event(&mut self, event: &Event) -> Result<Vec<Action>, String> {
        let mut actions = Vec::new();
        match event {
            Event::ResumeRequested { output_dir } => actions.push(Action::DownloadLatestValid {
                prefix: self.checkpoints_prefix.clone(),
                into: output_dir.clone(),
            }),
            Event::CheckpointSaved { step, dir, files } => {
                let name = format!("checkpoint-{step}");
                let manifest = super::manifest::MANIFEST;
                if !files.iter().any(|f| f == manifest) {
                    return Err(format!(
                        "{}: no {manifest}; not a complete checkpoint",
                        dir.display()
                    ));
                }
                let upload = |file: &String| Action::Upload {
                    local: dir.join(file),
                    key: key::join(&[&self.checkpoints_prefix, &name, file]),
                };
                actions.extend(files.iter().filter(|f| *f != manifest).map(upload));
                actions.push(upload(&manifest.to_string()));
                actions.extend(self.rotation());
            }
            Event::RunFinished {
                outcome,
                save_path,
                files,
            } => {
                if *outcome == RunOutcome::Completed {
                    actions.extend(files.iter().map(|file| Action::Upload {
                        local: save_path.join(file),
                        key: key::join(&[&self.outputs_prefix, file]),
                    }));
                }
                actions.extend(self.rotation());
            }
        }
        Ok(actions)
    }
}

impl Mirror {
    fn rotation(&self) -> Option<Action> {
        self.keep_last.map(|count| Action::KeepLast {
            prefix: self.checkpoints_prefix.clone(),
            count,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror(keep_last: Option<usize>) -> Mirror {
        Mirror {
            checkpoints_prefix: "ck".into(),
            outputs_prefix: "out".into(),
            keep_last,
        }
    }

    #[test]
    fn checkpoint_uploads_put_the_manifest_last_then_rotate() {
        let event = Event::CheckpointSaved {
            step: 7,
            dir: "/o/checkpoint-7".into(),
            files: vec!["a".into(), "manifest.json".into(), "z/b".into()],
        };
        let actions = mirror(Some(2)).on_event(&event).unwrap();
        let keys: Vec<_> = actions
            .iter()
            .map(|a| match a {
                Action::Upload { key, .. } => key.clone(),
                Action::KeepLast { count, .. } => format!("keep {count}"),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            keys,
            [
                "ck/checkpoint-7/a",
                "ck/checkpoint-7/z/b",
                "ck/checkpoint-7/manifest.json",
                "keep 2"
            ]
        );
    }

    #[test]
    fn a_checkpoint_without_manifest_is_refused() {
        let event = Event::CheckpointSaved {
            step: 1,
            dir: "/o/checkpoint-1".into(),
            files: vec!["a".into()],
        };
        assert!(mirror(None).on_event(&event).is_err());
    }

    #[test]
    fn final_artefacts_go_up_only_when_the_run_completed() {
        let finished = |outcome| Event::RunFinished {
            outcome,
            save_path: "/s".into(),
            files: vec!["adapter_model.safetensors".into()],
        };
        let ok = mirror(None)
            .on_event(&finished(RunOutcome::Completed))
            .unwrap();
        assert_eq!(
            ok,
            [Action::Upload {
                local: "/s/adapter_model.safetensors".into(),
                key: "out/adapter_model.safetensors".into()
            }]
        );
        for outcome in [RunOutcome::Failed, RunOutcome::Cancelled] {
            assert!(mirror(None)
                .on_event(&finished(outcome))
                .unwrap()
                .is_empty());
        }
    }
}
