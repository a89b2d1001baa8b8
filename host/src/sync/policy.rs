//! Sync policies: events in, actions out — the shape of the `sync` WIT world
//! (`wit/sync.wit`). A policy never touches files or the network; [`super::execute`] carries out
//! its actions natively, for the built-in [`Mirror`] and for `.wasm` policies
//! (`crate::plugin::sync_policy`) alike, after [`check_action`] has vetted them.

use std::path::{Component, Path, PathBuf};

use crate::storage::key;

/// How a run ended. A run stopped by a signal ends the process by that signal and sends no
/// event: pending uploads are dropped, as Kelpie's `sync.after` skips a cancelled job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    Completed,
    Failed,
}

/// A file the host made, relative to the directory its event names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalFile {
    /// `/`-separated, relative.
    pub path: String,
    pub size: u64,
    /// Lower-case hex, when known (checkpoint files: from their manifest).
    pub sha256: Option<String>,
}

/// What the job is about to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunStart {
    pub output_dir: PathBuf,
    pub save_path: PathBuf,
    /// `--resume`: fetch the newest remote checkpoint before training picks one.
    pub resume: bool,
    /// Newest local checkpoint whose manifest verifies.
    pub local_step: Option<u64>,
    /// `--save_total_limit`.
    pub save_total_limit: Option<usize>,
}

/// A complete `OUTPUT_DIR/checkpoint-<step>` directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedCheckpoint {
    pub step: u64,
    pub dir: PathBuf,
    /// Relative to `dir`, sorted, the manifest included.
    pub files: Vec<LocalFile>,
}

/// What a final artefact is (the `artefact-kind` of the WIT types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArtefactKind {
    Adapter,
    MergedModel,
    Gguf,
    Other,
}

/// Files of one final artefact, relative to `dir` (`--save_path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artefact {
    pub kind: ArtefactKind,
    pub dir: PathBuf,
    pub files: Vec<LocalFile>,
    /// GGUF preset, from the file name (`<name>.<PRESET>.gguf`).
    pub quantization: Option<String>,
}

/// Something that happened to the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Sent once, first, before training picks a checkpoint to resume from.
    RunStarting(RunStart),
    CheckpointSaved(SavedCheckpoint),
    /// The trainer deleted local `checkpoint-<step>` (`--save_total_limit` rotation).
    CheckpointDeleted(u64),
    /// With `Completed`, `artefacts` are the final artefacts under `--save_path`.
    RunFinished {
        outcome: RunOutcome,
        artefacts: Vec<Artefact>,
    },
}

impl Event {
    pub fn name(&self) -> &'static str {
        match self {
            Event::RunStarting(_) => "run-starting",
            Event::CheckpointSaved(_) => "checkpoint-saved",
            Event::CheckpointDeleted(_) => "checkpoint-deleted",
            Event::RunFinished { .. } => "run-finished",
        }
    }
}

/// Something the host should do with storage. Keys are relative to the store's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Upload {
        local: PathBuf,
        key: String,
    },
    Delete {
        key: String,
    },
    /// Delete every object of `prefix/checkpoint-<step>/`, the manifest first.
    DeleteCheckpoint {
        prefix: String,
        step: u64,
    },
    /// Delete every checkpoint under `prefix` older than the newest `count` valid ones.
    KeepLast {
        prefix: String,
        count: usize,
    },
    /// Download the newest checkpoint under `prefix` whose manifest verifies into `into`
    /// (`--output_dir`, as `into/checkpoint-N`), unless `into` already has one as new.
    DownloadLatestValid {
        prefix: String,
        into: PathBuf,
    },
}

/// A sync policy: the built-in [`Mirror`] or a `.wasm` plugin.
pub trait SyncPolicy: Send {
    fn name(&self) -> &str;
    fn on_event(&mut self, event: &Event) -> Result<Vec<Action>, String>;
}

/// Refuses what no policy may ask for, whoever wrote it: keys that are not plain relative keys,
/// uploads of files outside the run's two directories (a policy names files; it does not get to
/// read the disk), and downloads anywhere but `--output_dir` or at any moment but the start.
pub fn check_action(
    action: &Action,
    event: &Event,
    output_dir: &Path,
    save_path: &Path,
) -> Result<(), String> {
    let key_ok = |what: &str, k: &str| key::check(k).map_err(|e| format!("{what} {k:?}: {e}"));
    let prefix_ok = |p: &str| key::check_prefix(p).map_err(|e| format!("prefix {p:?}: {e}"));
    match action {
        Action::Upload { local, key } => {
            key_ok("key", key)?;
            let plain = local.components().all(|c| c != Component::ParentDir);
            let inside = local.starts_with(output_dir) || local.starts_with(save_path);
            if !(plain && inside) {
                return Err(format!(
                    "upload of {}: only files under --output_dir ({}) or --save_path ({}) may \
                     be uploaded",
                    local.display(),
                    output_dir.display(),
                    save_path.display()
                ));
            }
            Ok(())
        }
        Action::Delete { key } => key_ok("key", key),
        Action::DeleteCheckpoint { prefix, .. } | Action::KeepLast { prefix, .. } => {
            prefix_ok(prefix)
        }
        Action::DownloadLatestValid { prefix, into } => {
            prefix_ok(prefix)?;
            if !matches!(event, Event::RunStarting(_)) {
                return Err(format!(
                    "download-latest-valid answers run-starting only, not {}",
                    event.name()
                ));
            }
            if into != output_dir {
                return Err(format!(
                    "downloads go to --output_dir ({}), not {}",
                    output_dir.display(),
                    into.display()
                ));
            }
            Ok(())
        }
    }
}

/// Built-in `mirror`: the remote holds what the output directory holds. With `--resume` the
/// newest valid remote checkpoint is fetched first; checkpoints are uploaded once complete with
/// the manifest last (so a half-uploaded checkpoint is never taken as valid); `--save_total_limit`
/// is mirrored by keep-last after each upload, which — unlike deleting what the trainer deleted —
/// also removes what an earlier node left behind and never drops below the limit of *complete*
/// remote checkpoints; the final artefacts go up only when the run completed (as Kelpie's
/// `sync.after` does on exit 0).
#[derive(Debug, Clone)]
pub struct Mirror {
    /// Key prefix of checkpoints, e.g. `checkpoints`.
    pub checkpoints_prefix: String,
    /// Key prefix of final artefacts, e.g. `outputs`.
    pub outputs_prefix: String,
    /// `--save_total_limit`, from [`Event::RunStarting`].
    keep_last: Option<usize>,
}

impl Mirror {
    pub fn new(checkpoints_prefix: impl Into<String>, outputs_prefix: impl Into<String>) -> Self {
        Mirror {
            checkpoints_prefix: checkpoints_prefix.into(),
            outputs_prefix: outputs_prefix.into(),
            keep_last: None,
        }
    }

    fn rotation(&self) -> Option<Action> {
        self.keep_last.map(|count| Action::KeepLast {
            prefix: self.checkpoints_prefix.clone(),
            count,
        })
    }
}

impl SyncPolicy for Mirror {
    fn name(&self) -> &str {
        "mirror"
    }

    fn on_event(&mut self, event: &Event) -> Result<Vec<Action>, String> {
        let mut actions = Vec::new();
        match event {
            Event::RunStarting(start) => {
                self.keep_last = start.save_total_limit;
                if start.resume {
                    actions.push(Action::DownloadLatestValid {
                        prefix: self.checkpoints_prefix.clone(),
                        into: start.output_dir.clone(),
                    });
                }
            }
            Event::CheckpointSaved(checkpoint) => {
                let name = format!("checkpoint-{}", checkpoint.step);
                let manifest = super::manifest::MANIFEST;
                if !checkpoint.files.iter().any(|f| f.path == manifest) {
                    return Err(format!(
                        "{}: no {manifest}; not a complete checkpoint",
                        checkpoint.dir.display()
                    ));
                }
                let upload = |file: &LocalFile| Action::Upload {
                    local: checkpoint.dir.join(&file.path),
                    key: key::join(&[&self.checkpoints_prefix, &name, &file.path]),
                };
                let (last, first): (Vec<_>, Vec<_>) =
                    checkpoint.files.iter().partition(|f| f.path == manifest);
                actions.extend(first.into_iter().chain(last).map(upload));
                actions.extend(self.rotation());
            }
            // Rotation is mirrored by keep-last after each upload (see the type's docs).
            Event::CheckpointDeleted(_) => {}
            // A failed run leaves its queued checkpoint uploads to finish; nothing to add.
            Event::RunFinished { outcome, artefacts } if *outcome == RunOutcome::Completed => {
                for artefact in artefacts {
                    actions.extend(artefact.files.iter().map(|file| Action::Upload {
                        local: artefact.dir.join(&file.path),
                        key: key::join(&[&self.outputs_prefix, &file.path]),
                    }));
                }
            }
            Event::RunFinished { .. } => {}
        }
        Ok(actions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str) -> LocalFile {
        LocalFile {
            path: path.into(),
            size: 1,
            sha256: None,
        }
    }

    fn start(resume: bool, limit: Option<usize>) -> Event {
        Event::RunStarting(RunStart {
            output_dir: "/o".into(),
            save_path: "/s".into(),
            resume,
            local_step: None,
            save_total_limit: limit,
        })
    }

    fn mirror(limit: Option<usize>) -> Mirror {
        let mut m = Mirror::new("ck", "out");
        m.on_event(&start(false, limit)).unwrap();
        m
    }

    fn checkpoint(step: u64, files: &[&str]) -> Event {
        Event::CheckpointSaved(SavedCheckpoint {
            step,
            dir: format!("/o/checkpoint-{step}").into(),
            files: files.iter().map(|f| file(f)).collect(),
        })
    }

    #[test]
    fn resume_asks_for_the_newest_valid_checkpoint_into_the_output_dir() {
        let mut m = Mirror::new("ck", "out");
        assert_eq!(
            m.on_event(&start(true, None)).unwrap(),
            [Action::DownloadLatestValid {
                prefix: "ck".into(),
                into: "/o".into()
            }]
        );
        assert!(m.on_event(&start(false, None)).unwrap().is_empty());
    }

    #[test]
    fn checkpoint_uploads_put_the_manifest_last_then_rotate() {
        let event = checkpoint(7, &["a", "manifest.json", "z/b"]);
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
        assert!(mirror(None)
            .on_event(&Event::CheckpointDeleted(5))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_checkpoint_without_manifest_is_refused() {
        assert!(mirror(None).on_event(&checkpoint(1, &["a"])).is_err());
    }

    #[test]
    fn final_artefacts_go_up_only_when_the_run_completed() {
        let finished = |outcome| Event::RunFinished {
            outcome,
            artefacts: vec![Artefact {
                kind: ArtefactKind::Adapter,
                dir: "/s".into(),
                files: vec![file("adapter_model.safetensors")],
                quantization: None,
            }],
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
        assert!(mirror(None)
            .on_event(&finished(RunOutcome::Failed))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn actions_outside_the_run_are_refused() {
        let (o, s) = (Path::new("/o"), Path::new("/s"));
        let saved = checkpoint(1, &["manifest.json"]);
        let upload = |local: &str, key: &str| Action::Upload {
            local: local.into(),
            key: key.into(),
        };
        assert!(check_action(&upload("/o/checkpoint-1/a", "ck/a"), &saved, o, s).is_ok());
        assert!(check_action(&upload("/s/x.gguf", "out/x.gguf"), &saved, o, s).is_ok());
        for (action, needle) in [
            (upload("/etc/passwd", "x"), "only files under"),
            (upload("/o/../etc/passwd", "x"), "only files under"),
            (upload("/o/a", "../x"), "key"),
            (Action::Delete { key: "/abs".into() }, "key"),
            (
                Action::DownloadLatestValid {
                    prefix: "ck".into(),
                    into: "/o".into(),
                },
                "run-starting only",
            ),
        ] {
            let err = check_action(&action, &saved, o, s).unwrap_err();
            assert!(err.contains(needle), "{action:?}: {err}");
        }
        let elsewhere = Action::DownloadLatestValid {
            prefix: "ck".into(),
            into: "/tmp".into(),
        };
        let err = check_action(&elsewhere, &start(true, None), o, s).unwrap_err();
        assert!(err.contains("--output_dir"), "{err}");
    }
}
