//! Sync policies: write a [`SyncPolicy`] (events in, actions out), export it with
//! [`crate::export_sync_policy!`], build for wasm32-wasip2 and pass the `.wasm` to
//! `ferrotune --sync`. The host executes the actions natively (uploads, deletions, resume
//! downloads) in the background, retrying through storage outages; a policy never touches
//! files or the network. Unit tests run natively through [`SyncHarness`].
//!
//! ```ignore
//! use ferrotune_plugin_sdk::sync::{Action, Event, SyncPolicy};
//! use ferrotune_plugin_sdk::export_sync_policy;
//!
//! struct FinalOnly;
//!
//! impl SyncPolicy for FinalOnly {
//!     const NAME: &'static str = "final-only";
//!     type Config = serde_json::Value;
//!     fn new(_: Self::Config) -> Result<Self, String> { Ok(FinalOnly) }
//!     fn on_event(&mut self, event: Event) -> Result<Vec<Action>, String> {
//!         Ok(match event {
//!             Event::RunFinished { artefacts, .. } => artefacts
//!                 .iter()
//!                 .flat_map(|a| a.upload_all("outputs"))
//!                 .collect(),
//!             _ => Vec::new(),
//!         })
//!     }
//! }
//! export_sync_policy!(FinalOnly);
//! ```

use serde::de::DeserializeOwned;
use serde::Deserialize as _;

/// The manifest of a checkpoint directory; the host writes it last, and a remote checkpoint
/// counts as valid only when it is there and verifies. Upload it last.
pub const MANIFEST: &str = "manifest.json";

/// Generated bindings for the `sync` world. Not part of the SDK's API.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "ferrotune:plugin/sync",
        pub_export_macro: true,
        export_macro_name: "__export_sync_world",
        default_bindings_module: "ferrotune_plugin_sdk::sync::bindings",
        runtime_path: "ferrotune_plugin_sdk::sync::bindings::__wit_bindgen::rt",
    });
    pub use wit_bindgen as __wit_bindgen;
}

use bindings::exports::ferrotune::plugin::sync_policy as wit;
use bindings::ferrotune::plugin::types as wit_types;

/// A file the host made, relative to the directory its event names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    pub path: String,
    pub size: u64,
    /// Lower-case hex, when the host computed it (checkpoint files: always).
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArtefactKind {
    Adapter,
    MergedModel,
    Gguf,
    Checkpoint,
    Logs,
    Other,
}

/// A finished artefact: a directory (or a single file) and its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artefact {
    pub kind: ArtefactKind,
    /// Local directory the files are relative to (the host always sends a directory, e.g.
    /// `--save_path` for a GGUF file in it).
    pub path: String,
    pub files: Vec<FileInfo>,
    /// For GGUF files: the quantization preset.
    pub quantization: Option<String>,
}

impl Artefact {
    /// Uploads of every file of the artefact to `prefix/<file>`.
    pub fn upload_all(&self, prefix: &str) -> Vec<Action> {
        self.files
            .iter()
            .map(|file| Action::Upload {
                local_path: format!("{}/{}", self.path.trim_end_matches('/'), file.path),
                key: key_join(&[prefix, &file.path]),
            })
            .collect()
    }
}

/// What the host knows as the run starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunStart {
    pub output_dir: String,
    pub save_path: String,
    /// `--resume`: the policy should return [`Action::DownloadLatestValid`] to resume from
    /// storage.
    pub resume: bool,
    /// Newest local checkpoint whose manifest verifies.
    pub local_step: Option<u64>,
    /// `--save_total_limit`.
    pub save_total_limit: Option<u32>,
}

/// A complete checkpoint directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub step: u64,
    pub dir: String,
    /// Relative to `dir`, sorted; [`MANIFEST`] included.
    pub files: Vec<FileInfo>,
}

impl Checkpoint {
    /// `checkpoint-<step>`.
    pub fn name(&self) -> String {
        format!("checkpoint-{}", self.step)
    }

    /// Uploads of every file to `prefix/checkpoint-<step>/<file>`, the manifest last, so that
    /// a checkpoint cut off mid-upload is never taken as valid.
    pub fn upload_all(&self, prefix: &str) -> Vec<Action> {
        let name = self.name();
        let upload = |file: &FileInfo| Action::Upload {
            local_path: format!("{}/{}", self.dir.trim_end_matches('/'), file.path),
            key: key_join(&[prefix, &name, &file.path]),
        };
        let mut actions: Vec<Action> = self
            .files
            .iter()
            .filter(|f| f.path != MANIFEST)
            .map(upload)
            .collect();
        actions.extend(self.files.iter().filter(|f| f.path == MANIFEST).map(upload));
        actions
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    Completed,
    Failed,
}

/// Something that happened to the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    RunStarting(RunStart),
    CheckpointSaved(Checkpoint),
    /// The trainer deleted local `checkpoint-<step>` (`--save_total_limit`).
    CheckpointDeleted(u64),
    RunFinished {
        outcome: RunOutcome,
        /// With `Completed`: the final artefacts.
        artefacts: Vec<Artefact>,
    },
}

/// Something the host should do with the job's storage. Keys are relative to its root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Upload { local_path: String, key: String },
    Delete { key: String },
    DeleteCheckpoint { prefix: String, step: u64 },
    KeepLast { prefix: String, count: u32 },
    DownloadLatestValid { prefix: String },
}

/// Joins key segments with `/`, skipping empty ones and stray slashes.
pub fn key_join(parts: &[&str]) -> String {
    parts
        .iter()
        .map(|p| p.trim_matches('/'))
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

/// A sync policy. Keep it deterministic in the events: after a crash the host starts a fresh
/// instance on another node, and only storage remembers what the old one did.
pub trait SyncPolicy: Sized + 'static {
    /// Short name shown by `ferrotune plugin inspect` and in the host's log.
    const NAME: &'static str;
    /// The plugin's own version.
    const VERSION: &'static str = "0.1.0";
    /// One line for humans.
    const DESCRIPTION: &'static str = "";
    /// JSON Schema of [`SyncPolicy::Config`], if you want `plugin inspect` to show one.
    const CONFIG_SCHEMA: Option<&'static str> = None;

    /// The policy's part of `--sync_config` (`{}` when there is none).
    type Config: DeserializeOwned;

    fn new(config: Self::Config) -> Result<Self, String>;

    /// Actions for one event, executed in order. An error fails the job with the message.
    fn on_event(&mut self, event: Event) -> Result<Vec<Action>, String>;
}

/// `describe` of the WIT interface.
#[doc(hidden)]
pub fn describe<P: SyncPolicy>() -> wit_types::PluginInfo {
    wit_types::PluginInfo {
        name: P::NAME.to_string(),
        version: P::VERSION.to_string(),
        description: P::DESCRIPTION.to_string(),
        config_schema: P::CONFIG_SCHEMA.map(str::to_string),
    }
}

/// `configure`: parses the JSON config (`null` → `{}`) and builds the policy.
pub fn configure<P: SyncPolicy>(config: &str) -> Result<P, String> {
    let mut value: serde_json::Value = serde_json::from_str(config)
        .map_err(|e| format!("sync policy config is not valid JSON: {e}"))?;
    if value.is_null() {
        value = serde_json::Value::Object(Default::default());
    }
    let config = P::Config::deserialize(value)
        .map_err(|e| format!("invalid config for sync policy {}: {e}", P::NAME))?;
    P::new(config)
}

/// The glue behind `configure` of [`crate::export_sync_policy!`].
#[doc(hidden)]
pub fn wit_configure<P: SyncPolicy>(config: &str) -> Result<P, wit_types::PluginError> {
    configure::<P>(config).map_err(wit_types::PluginError::InvalidConfig)
}

/// The glue behind `on-event` of [`crate::export_sync_policy!`].
#[doc(hidden)]
pub fn wit_on_event<P: SyncPolicy>(
    policy: Option<&mut P>,
    event: wit::Event,
) -> Result<Vec<wit::Action>, wit_types::PluginError> {
    let Some(policy) = policy else {
        return Err(wit_types::PluginError::Other(format!(
            "{}: on-event called before configure",
            P::NAME
        )));
    };
    policy
        .on_event(from_wit(event))
        .map(|actions| actions.into_iter().map(to_wit).collect())
        .map_err(wit_types::PluginError::Other)
}

fn file_from_wit(f: wit_types::FileInfo) -> FileInfo {
    FileInfo {
        path: f.path,
        size: f.size,
        sha256: f.sha256,
    }
}

fn from_wit(event: wit::Event) -> Event {
    match event {
        wit::Event::RunStarting(s) => Event::RunStarting(RunStart {
            output_dir: s.output_dir,
            save_path: s.save_path,
            resume: s.resume,
            local_step: s.local_step,
            save_total_limit: s.save_total_limit,
        }),
        wit::Event::CheckpointSaved(c) => Event::CheckpointSaved(Checkpoint {
            step: c.step,
            dir: c.dir,
            files: c.files.into_iter().map(file_from_wit).collect(),
        }),
        wit::Event::CheckpointDeleted(step) => Event::CheckpointDeleted(step),
        wit::Event::RunFinished(end) => Event::RunFinished {
            outcome: match end.outcome {
                wit::RunOutcome::Completed => RunOutcome::Completed,
                wit::RunOutcome::Failed => RunOutcome::Failed,
            },
            artefacts: end
                .artefacts
                .into_iter()
                .map(|a| Artefact {
                    kind: match a.kind {
                        wit_types::ArtefactKind::Adapter => ArtefactKind::Adapter,
                        wit_types::ArtefactKind::MergedModel => ArtefactKind::MergedModel,
                        wit_types::ArtefactKind::Gguf => ArtefactKind::Gguf,
                        wit_types::ArtefactKind::Checkpoint => ArtefactKind::Checkpoint,
                        wit_types::ArtefactKind::Logs => ArtefactKind::Logs,
                        wit_types::ArtefactKind::Other => ArtefactKind::Other,
                    },
                    path: a.path,
                    files: a.files.into_iter().map(file_from_wit).collect(),
                    quantization: a.quantization,
                })
                .collect(),
        },
    }
}

fn to_wit(action: Action) -> wit::Action {
    match action {
        Action::Upload { local_path, key } => wit::Action::Upload(wit::Upload { local_path, key }),
        Action::Delete { key } => wit::Action::Delete(key),
        Action::DeleteCheckpoint { prefix, step } => {
            wit::Action::DeleteCheckpoint(wit::RemoteCheckpoint { prefix, step })
        }
        Action::KeepLast { prefix, count } => {
            wit::Action::KeepLast(wit::KeepLast { prefix, count })
        }
        Action::DownloadLatestValid { prefix } => wit::Action::DownloadLatestValid(prefix),
    }
}

/// A configured policy in a native test, as the host would have it after `configure`.
pub struct SyncHarness<P: SyncPolicy> {
    policy: P,
}

impl<P: SyncPolicy> SyncHarness<P> {
    /// Configures the policy with `config` (`serde_json::Value::Null` for none).
    pub fn new(config: serde_json::Value) -> Result<Self, String> {
        Ok(SyncHarness {
            policy: configure::<P>(&config.to_string())?,
        })
    }

    /// The actions for one event.
    pub fn event(&mut self, event: Event) -> Result<Vec<Action>, String> {
        self.policy.on_event(event)
    }
}

/// Exports a [`SyncPolicy`] as the component's `sync-policy` interface. The configured policy
/// lives in a per-instance slot; an event before `configure` is an error value, not a trap.
#[macro_export]
macro_rules! export_sync_policy {
    ($policy:ty) => {
        const _: () = {
            use $crate::sync::bindings::exports::ferrotune::plugin::sync_policy as __wit;
            use $crate::sync::bindings::ferrotune::plugin::types as __wit_types;

            struct FerrotuneSyncExport;

            ::std::thread_local! {
                static CONFIGURED: ::std::cell::RefCell<::std::option::Option<$policy>> =
                    const { ::std::cell::RefCell::new(::std::option::Option::None) };
            }

            impl __wit::Guest for FerrotuneSyncExport {
                fn describe() -> __wit_types::PluginInfo {
                    $crate::sync::describe::<$policy>()
                }

                fn configure(
                    config: ::std::string::String,
                ) -> ::std::result::Result<(), __wit_types::PluginError> {
                    let policy = $crate::sync::wit_configure::<$policy>(&config)?;
                    CONFIGURED.with(|slot| *slot.borrow_mut() = ::std::option::Option::Some(policy));
                    ::std::result::Result::Ok(())
                }

                fn on_event(
                    event: __wit::Event,
                ) -> ::std::result::Result<::std::vec::Vec<__wit::Action>, __wit_types::PluginError>
                {
                    CONFIGURED.with(|slot| {
                        $crate::sync::wit_on_event::<$policy>(slot.borrow_mut().as_mut(), event)
                    })
                }
            }

            #[cfg(target_arch = "wasm32")]
            $crate::sync::bindings::__export_sync_world!(FerrotuneSyncExport with_types_in $crate::sync::bindings);
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_uploads_put_the_manifest_last() {
        let file = |path: &str| FileInfo {
            path: path.into(),
            size: 1,
            sha256: None,
        };
        let ck = Checkpoint {
            step: 4,
            dir: "/o/checkpoint-4/".into(),
            files: vec![file("a"), file(MANIFEST), file("z/b")],
        };
        let keys: Vec<_> = ck
            .upload_all("/ck/")
            .into_iter()
            .map(|a| match a {
                Action::Upload { local_path, key } => format!("{local_path} -> {key}"),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            keys,
            [
                "/o/checkpoint-4/a -> ck/checkpoint-4/a",
                "/o/checkpoint-4/z/b -> ck/checkpoint-4/z/b",
                "/o/checkpoint-4/manifest.json -> ck/checkpoint-4/manifest.json"
            ]
        );
    }

    #[test]
    fn artefact_uploads_keep_relative_paths() {
        let gguf = Artefact {
            kind: ArtefactKind::Gguf,
            path: "/s/".into(),
            files: vec![FileInfo {
                path: "m.Q8_0.gguf".into(),
                size: 9,
                sha256: None,
            }],
            quantization: Some("q8_0".into()),
        };
        assert_eq!(
            gguf.upload_all("out"),
            [Action::Upload {
                local_path: "/s/m.Q8_0.gguf".into(),
                key: "out/m.Q8_0.gguf".into()
            }]
        );
    }
}
