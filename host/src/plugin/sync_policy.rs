//! `--sync PATH.wasm`: a sync policy as a plugin of the `sync` world. One sandboxed instance per
//! job (no files, no network, memory cap, a deadline per call), configured once with the
//! policy's part of `--sync_config`, then asked `on-event` for each event. It implements the same
//! [`SyncPolicy`] trait as the built-in `mirror`, so its actions go through the same checks and
//! the same native executor; it only ever returns data.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use wasmtime::component::{HasSelf, Linker};
use wasmtime::Store;

use super::formatter::{trap_error, PluginInfo};
use super::runtime::PluginRuntime;
use super::sandbox::{self, PluginState};
use super::wasm_err;
use super::world::{self, Kind, World};
use crate::cli::UsageError;
use crate::sync::policy::{Action, ArtefactKind, Event, LocalFile, RunOutcome, SyncPolicy};

/// Host bindings of the `sync` world, `ferrotune:plugin@0.1.0`.
/// Its `types` and `log` imports are the formatter world's (`super::bindings`), whose
/// implementation for [`PluginState`] serves both.
mod v0_1_0 {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "ferrotune:plugin/sync",
        with: {
            "ferrotune:plugin/types": crate::plugin::bindings::v0_1_0::ferrotune::plugin::types,
            "ferrotune:plugin/log": crate::plugin::bindings::v0_1_0::ferrotune::plugin::log,
        },
    });
}

use crate::plugin::bindings::v0_1_0::ferrotune::plugin::types as wit_types;
use v0_1_0::exports::ferrotune::plugin::sync_policy as wit;

/// A configured `.wasm` sync policy.
pub struct WasmSyncPolicy {
    name: Arc<str>,
    store: Store<PluginState>,
    bindings: v0_1_0::Sync,
    timeout: Duration,
    /// `--output_dir` from `run-starting`: where `download-latest-valid` lands.
    output_dir: PathBuf,
}

impl WasmSyncPolicy {
    /// Loads `path`, checks it is a sync policy this host can run, and configures it with
    /// `config` (JSON text). Errors name the flag to fix.
    pub fn load(runtime: &PluginRuntime, path: &Path, config: &str) -> Result<Self> {
        let wasm = std::fs::read(path).map_err(|e| {
            UsageError::new(format!(
                "--sync {}: cannot read it ({e}); pass mirror or a sync policy .wasm component",
                path.display()
            ))
        })?;
        let name = super::file_label(path);
        let (mut policy, found) = Self::instantiate(runtime, &name, &wasm)?;
        let info = policy.describe()?;
        sandbox::arm_deadline(&mut policy.store, policy.timeout);
        policy
            .bindings
            .ferrotune_plugin_sync_policy()
            .call_configure(&mut policy.store, config)
            .map_err(|e| trap_error(&policy.store, e, policy.timeout))?
            .map_err(|e| {
                UsageError::new(format!(
                    "--sync_config: sync plugin {} rejected it: {}",
                    policy.name,
                    plugin_error(e)
                ))
            })?;
        tracing::info!(
            plugin = %policy.name,
            world = %found,
            name = info.name,
            version = info.version,
            "sync policy plugin loaded"
        );
        Ok(policy)
    }

    /// A fresh, unconfigured instance in its own sandboxed Store.
    fn instantiate(runtime: &PluginRuntime, name: &str, wasm: &[u8]) -> Result<(Self, World)> {
        let component = runtime.component(name, wasm)?;
        let found: World = world::detect(runtime.engine(), &component, name)?;
        if found.kind != Kind::Sync {
            bail!(UsageError::new(format!(
                "--sync {name}: this is a {} plugin, not a sync policy",
                found.kind
            )));
        }
        let mut linker: Linker<PluginState> = Linker::new(runtime.engine());
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(wasm_err)?;
        v0_1_0::Sync::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(wasm_err)?;
        let timeout = runtime.limits().timeout;
        let name: Arc<str> = name.into();
        let mut store = sandbox::new_store(runtime, name.clone());
        let bindings = v0_1_0::Sync::instantiate(&mut store, &component, &linker)
            .map_err(|e| trap_error(&store, e, timeout))
            .with_context(|| {
                format!(
                    "sync plugin {name}: cannot instantiate it (a sync policy may import only \
                     WASI without files or network, and ferrotune:plugin/log)"
                )
            })?;
        let policy = WasmSyncPolicy {
            name,
            store,
            bindings,
            timeout,
            output_dir: PathBuf::new(),
        };
        Ok((policy, found))
    }

    fn describe(&mut self) -> Result<PluginInfo> {
        sandbox::arm_deadline(&mut self.store, self.timeout);
        let info = self
            .bindings
            .ferrotune_plugin_sync_policy()
            .call_describe(&mut self.store)
            .map_err(|e| trap_error(&self.store, e, self.timeout))?;
        Ok(PluginInfo {
            name: info.name,
            version: info.version,
            description: info.description,
            config_schema: info.config_schema,
        })
    }
}

/// Describes a sync policy without configuring it (for `ferrotune plugin inspect`).
pub fn describe_component(runtime: &PluginRuntime, name: &str, wasm: &[u8]) -> Result<PluginInfo> {
    WasmSyncPolicy::instantiate(runtime, name, wasm)?
        .0
        .describe()
}

impl SyncPolicy for WasmSyncPolicy {
    fn name(&self) -> &str {
        &self.name
    }

    fn on_event(&mut self, event: &Event) -> Result<Vec<Action>, String> {
        if let Event::RunStarting(start) = event {
            self.output_dir = start.output_dir.clone();
        }
        let wit_event = to_wit(event);
        sandbox::arm_deadline(&mut self.store, self.timeout);
        let answer = self
            .bindings
            .ferrotune_plugin_sync_policy()
            .call_on_event(&mut self.store, &wit_event)
            .map_err(|e| format!("{:#}", trap_error(&self.store, e, self.timeout)))?;
        let actions = answer.map_err(|e| format!("{}: {}", event.name(), plugin_error(e)))?;
        Ok(actions
            .into_iter()
            .map(|a| from_wit(a, &self.output_dir))
            .collect())
    }
}

fn plugin_error(e: wit_types::PluginError) -> String {
    match e {
        wit_types::PluginError::InvalidConfig(m) => format!("invalid config: {m}"),
        wit_types::PluginError::NotFound(m) => format!("not found: {m}"),
        wit_types::PluginError::Denied(m) => format!("denied: {m}"),
        wit_types::PluginError::Other(m) => m,
    }
}

fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn files_to_wit(files: &[LocalFile]) -> Vec<wit_types::FileInfo> {
    files
        .iter()
        .map(|f| wit_types::FileInfo {
            path: f.path.clone(),
            size: f.size,
            sha256: f.sha256.clone(),
        })
        .collect()
}

fn to_wit(event: &Event) -> wit::Event {
    match event {
        Event::RunStarting(s) => wit::Event::RunStarting(wit::RunStart {
            output_dir: path_text(&s.output_dir),
            save_path: path_text(&s.save_path),
            resume: s.resume,
            local_step: s.local_step,
            save_total_limit: s
                .save_total_limit
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        }),
        Event::CheckpointSaved(c) => wit::Event::CheckpointSaved(wit::Checkpoint {
            step: c.step,
            dir: path_text(&c.dir),
            files: files_to_wit(&c.files),
        }),
        Event::CheckpointDeleted(step) => wit::Event::CheckpointDeleted(*step),
        Event::RunFinished { outcome, artefacts } => wit::Event::RunFinished(wit::RunEnd {
            outcome: match outcome {
                RunOutcome::Completed => wit::RunOutcome::Completed,
                RunOutcome::Failed => wit::RunOutcome::Failed,
            },
            artefacts: artefacts
                .iter()
                .map(|a| wit_types::Artefact {
                    kind: match a.kind {
                        ArtefactKind::Adapter => wit_types::ArtefactKind::Adapter,
                        ArtefactKind::MergedModel => wit_types::ArtefactKind::MergedModel,
                        ArtefactKind::Gguf => wit_types::ArtefactKind::Gguf,
                        ArtefactKind::Other => wit_types::ArtefactKind::Other,
                    },
                    path: path_text(&a.dir),
                    files: files_to_wit(&a.files),
                    quantization: a.quantization.clone(),
                })
                .collect(),
        }),
    }
}

fn from_wit(action: wit::Action, output_dir: &Path) -> Action {
    match action {
        wit::Action::Upload(u) => Action::Upload {
            local: PathBuf::from(u.local_path),
            key: u.key,
        },
        wit::Action::Delete(key) => Action::Delete { key },
        wit::Action::DeleteCheckpoint(c) => Action::DeleteCheckpoint {
            prefix: c.prefix,
            step: c.step,
        },
        wit::Action::KeepLast(k) => Action::KeepLast {
            prefix: k.prefix,
            count: k.count as usize,
        },
        wit::Action::DownloadLatestValid(prefix) => Action::DownloadLatestValid {
            prefix,
            into: output_dir.to_path_buf(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::PluginLimits;
    use crate::sync::policy::{RunStart, SavedCheckpoint};

    /// The example policy `plugins/sync-sparse`, built by build.rs.
    fn sparse(config: &str) -> Result<WasmSyncPolicy> {
        let cache = tempfile::tempdir().unwrap();
        let runtime =
            PluginRuntime::with_cache_dir(PluginLimits::default(), Some(cache.path().into()))
                .unwrap();
        let path = Path::new(env!("FERROTUNE_SYNC_SPARSE_PLUGIN"));
        WasmSyncPolicy::load(&runtime, path, config)
    }

    fn file(path: &str) -> LocalFile {
        LocalFile {
            path: path.into(),
            size: 3,
            sha256: Some("ab".into()),
        }
    }

    #[test]
    fn events_and_actions_cross_the_boundary_intact() {
        let mut policy = sparse(r#"{"upload_every_steps": 2, "keep_last": 3}"#).unwrap();
        assert_eq!(policy.name(), "sync-sparse.wasm");
        let start = Event::RunStarting(RunStart {
            output_dir: "/o".into(),
            save_path: "/s".into(),
            resume: true,
            local_step: Some(4),
            save_total_limit: Some(2),
        });
        // The plugin names a prefix; the host fills in where downloads land.
        assert_eq!(
            policy.on_event(&start).unwrap(),
            [Action::DownloadLatestValid {
                prefix: "checkpoints".into(),
                into: "/o".into()
            }]
        );
        let saved = Event::CheckpointSaved(SavedCheckpoint {
            step: 6,
            dir: "/o/checkpoint-6".into(),
            files: vec![file("a.bin"), file("manifest.json")],
        });
        assert_eq!(
            policy.on_event(&saved).unwrap(),
            [
                Action::Upload {
                    local: "/o/checkpoint-6/a.bin".into(),
                    key: "checkpoints/checkpoint-6/a.bin".into()
                },
                Action::Upload {
                    local: "/o/checkpoint-6/manifest.json".into(),
                    key: "checkpoints/checkpoint-6/manifest.json".into()
                },
                Action::KeepLast {
                    prefix: "checkpoints".into(),
                    count: 3
                },
            ]
        );
        assert!(policy
            .on_event(&Event::CheckpointDeleted(4))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn inspect_describes_a_sync_policy() {
        let cache = tempfile::tempdir().unwrap();
        let runtime =
            PluginRuntime::with_cache_dir(PluginLimits::default(), Some(cache.path().into()))
                .unwrap();
        let report = crate::plugin::inspect::inspect(
            &runtime,
            Path::new(env!("FERROTUNE_SYNC_SPARSE_PLUGIN")),
        )
        .unwrap();
        for needle in [
            "kind:        sync",
            "name:        sync-sparse",
            "upload_every_steps",
        ] {
            assert!(report.contains(needle), "{needle:?} not in:\n{report}");
        }
    }

    #[test]
    fn a_rejected_config_is_a_usage_error_naming_plugin_and_key() {
        let err = sparse(r#"{"upload_every_steps": 0}"#).err().unwrap();
        assert!(err.downcast_ref::<UsageError>().is_some(), "{err:#}");
        let text = format!("{err:#}");
        assert!(
            text.contains("sync-sparse.wasm") && text.contains("upload_every_steps"),
            "{text}"
        );
    }
}
