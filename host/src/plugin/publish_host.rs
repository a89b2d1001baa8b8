//! Hosts a plugin of the `publish` world: the built-in `hf-hub` (crate `hf-publish`), embedded
//! in the binary, which pushes the run's artefacts to a Hugging Face-compatible Hub, and a
//! user's `--publish PATH.wasm`, configured by `--publish_config`.
//!
//! - Files: the plugin reads only the files of the artefacts it was handed, through
//!   `open-artefact.open` (a `body-reader` over the local file, chunks of at most
//!   [`MAX_CHUNK`]); any other path is `denied`. No file system otherwise.
//! - Network: `wasi:http` only ([`NetGrant`]). `hf-hub`: the endpoint's `host:port`, plus any
//!   host over the endpoint's scheme, because the Hub's LFS batch answer names presigned storage
//!   URLs (S3, CloudFront, …) the host cannot know in advance; each such request is logged and
//!   the plugin sends the token only to the endpoint's origin. A user's plugin: the
//!   `allow_hosts` of its `--publish_config`, nothing else.
//! - Tokens and `--publish_config` secrets reach the plugin's `configure` only; the plugin's log
//!   lines, stdout/stderr and error messages are masked.
//! - `host-export.request-export` returns an artefact this run already produced (the host
//!   exports before it publishes); anything else is `not-found` naming the flag that makes it.
//! - A call may run as long as it keeps reading file bytes; `--plugin_timeout_s` (at least
//!   [`MIN_IDLE`]) without progress traps it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use wasmtime::component::{Component, HasSelf, Linker, Resource};
use wasmtime::{Store, Trap};

use super::net_grant::NetGrant;
use super::net_state::{self, BodyReader, NetState};
use super::runtime::{PluginLimits, PluginRuntime};
use super::storage_config::{NetPluginConfig, Secrets};
use super::world::{self, Kind};
use super::{file_label, wasm_err};
use crate::cli::UsageError;

pub use super::net_state::MAX_CHUNK;
/// Shortest no-progress deadline: a Hub may take a while to answer a commit of large files.
pub const MIN_IDLE: Duration = Duration::from_secs(300);
/// The public Hub; `HF_ENDPOINT` overrides it.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The `hf-hub` publish plugin, built from `plugins/hf-publish` by `build.rs`.
const HF_PUBLISH_WASM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hf-publish.wasm"));
const PLUGIN_NAME: &str = "hf-hub";

// Host bindings of the `publish` world; the imports it shares with the storage world
// (`types`, `log`, `host-files`: no body-writer is ever handed out here) from `net_state`.
super::net_state::net_world_bindings!("ferrotune:plugin/publish");

use v0_1_0::ferrotune::plugin::{host_export, open_artefact, types as wit_types};

/// What is pushed: a directory of files of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArtefactKind {
    Adapter,
    MergedModel,
    Gguf,
}

#[derive(Debug, Clone)]
pub struct PushArtefact {
    pub kind: ArtefactKind,
    pub dir: PathBuf,
    /// File names relative to `dir` (also their paths in the repository).
    pub files: Vec<String>,
    pub quantization: Option<String>,
}

/// One push: where, as whom, what.
pub struct PushRequest {
    /// Base URL of the Hub (`HF_ENDPOINT`, default [`DEFAULT_ENDPOINT`]).
    pub endpoint: String,
    /// Secret: reaches the plugin's configure only.
    pub token: String,
    /// `owner/name`.
    pub repo_id: String,
    pub message: String,
    pub artefacts: Vec<PushArtefact>,
}

/// The endpoint from `HF_ENDPOINT`, else the public Hub.
pub fn endpoint_from_env() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
}

/// The artefacts a publish instance was handed: the only files it may open.
struct Handed {
    artefacts: Vec<wit_types::Artefact>,
}

/// A publish instance's Store data: the network sandbox plus the artefacts.
type PublishState = NetState<Handed>;

impl Handed {
    fn may_open(&self, path: &str) -> bool {
        self.artefacts.iter().any(|a| {
            a.files
                .iter()
                .any(|f| path == format!("{}/{}", a.path.trim_end_matches('/'), f.path))
        })
    }
}

impl open_artefact::Host for PublishState {
    fn open(&mut self, path: String) -> Result<Resource<BodyReader>, wit_types::PluginError> {
        if !self.world.may_open(&path) {
            return Err(wit_types::PluginError::Denied(format!(
                "{path} is not a file of the artefacts handed to the plugin"
            )));
        }
        let file = File::open(&path)
            .map_err(|e| wit_types::PluginError::NotFound(format!("{path}: {e}")))?;
        let size = file
            .metadata()
            .map_err(|e| wit_types::PluginError::Other(format!("{path}: {e}")))?
            .len();
        self.table()
            .push(BodyReader::new(file, size))
            .map_err(|e| wit_types::PluginError::Other(format!("host resource table: {e}")))
    }
}

impl host_export::Host for PublishState {
    fn request_export(
        &mut self,
        kind: host_export::ExportKind,
        quantization: Option<String>,
    ) -> Result<wit_types::Artefact, wit_types::PluginError> {
        use host_export::ExportKind as K;
        use wit_types::ArtefactKind as A;
        let (want, flag) = match kind {
            K::LoraAdapter => (A::Adapter, "--save_method lora"),
            K::Merged16bit => (A::MergedModel, "--save_method merged_16bit"),
            K::Merged4bit => (A::MergedModel, "--save_method merged_4bit"),
            K::Gguf => (A::Gguf, "--save_gguf --quantization"),
        };
        self.world
            .artefacts
            .iter()
            .find(|a| a.kind == want && (quantization.is_none() || a.quantization == quantization))
            .cloned()
            .ok_or_else(|| {
                wit_types::PluginError::NotFound(format!(
                    "this run did not produce that artefact; the host exports before publishing \
                     (ask for it with {flag})"
                ))
            })
    }
}

fn wit_artefact(a: &PushArtefact) -> Result<wit_types::Artefact> {
    let path = a.dir.to_str().with_context(|| {
        format!(
            "{}: the path is not UTF-8, which a publish plugin cannot be handed",
            a.dir.display()
        )
    })?;
    let mut files = Vec::new();
    for name in &a.files {
        let size = std::fs::metadata(a.dir.join(name))
            .with_context(|| format!("cannot publish {}", a.dir.join(name).display()))?
            .len();
        files.push(wit_types::FileInfo {
            path: name.clone(),
            size,
            sha256: None,
        });
    }
    Ok(wit_types::Artefact {
        kind: match a.kind {
            ArtefactKind::Adapter => wit_types::ArtefactKind::Adapter,
            ArtefactKind::MergedModel => wit_types::ArtefactKind::MergedModel,
            ArtefactKind::Gguf => wit_types::ArtefactKind::Gguf,
        },
        path: path.to_string(),
        files,
        quantization: a.quantization.clone(),
    })
}

/// Checks `owner/name` as the Hub spells repository ids (the plugin checks again).
pub fn check_repo_id(repo_id: &str) -> Result<(), String> {
    let ok_part = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with(['.', '-'])
            && !p.ends_with('.')
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let parts: Vec<&str> = repo_id.split('/').collect();
    if parts.len() != 2 || !parts.iter().all(|p| ok_part(p)) {
        return Err(format!(
            "{repo_id:?} is not a Hub repository id: use OWNER/NAME with letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

/// `host:port` of an http(s) URL and its scheme.
fn endpoint_authority(endpoint: &str) -> Result<(String, &'static str)> {
    let uri: http::Uri = endpoint
        .parse()
        .with_context(|| format!("HF_ENDPOINT {endpoint:?} is not a URL"))?;
    let scheme = match uri.scheme_str() {
        Some("https") => "https",
        Some("http") => "http",
        _ => bail!("HF_ENDPOINT {endpoint:?}: use an http:// or https:// URL"),
    };
    let host = uri
        .host()
        .with_context(|| format!("HF_ENDPOINT {endpoint:?} has no host"))?
        .to_ascii_lowercase();
    let port = uri
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    Ok((format!("{host}:{port}"), scheme))
}

/// Pushes `req.artefacts` with the built-in `hf-hub` plugin; returns the commit URL(s).
pub fn push(limits: PluginLimits, req: &PushRequest) -> Result<Vec<String>> {
    let runtime = publish_runtime(limits)?;
    let (authority, scheme) = endpoint_authority(&req.endpoint)?;
    let artefacts = wit_artefacts(&req.artefacts)?;
    let component = runtime.component(PLUGIN_NAME, HF_PUBLISH_WASM)?;
    tracing::info!(
        plugin = PLUGIN_NAME,
        endpoint = %req.endpoint,
        repo = %req.repo_id,
        "pushing to the Hub (network: {authority}, and any {scheme} host for LFS uploads)"
    );
    let config = serde_json::json!({
        "endpoint": req.endpoint,
        "token": req.token,
        "repo_id": req.repo_id,
        "message": req.message,
    });
    let name: Arc<str> = PLUGIN_NAME.into();
    let grant = NetGrant::new(name.clone(), vec![authority], runtime.limits().timeout)
        .any_host_over(scheme);
    let run = PublishRun {
        name,
        grant,
        secrets: Secrets::new(vec![req.token.clone()]),
        config: config.to_string(),
        allowed: "neither the Hub endpoint nor a host over the endpoint's scheme",
    };
    run.publish(&runtime, &component, artefacts)
}

/// Runs the user's publish plugin `path` with `config` (`--publish_config`) on `artefacts`;
/// returns what it reports (URLs or ids).
pub fn publish_with_plugin(
    limits: PluginLimits,
    path: &Path,
    config: &NetPluginConfig,
    artefacts: &[PushArtefact],
) -> Result<Vec<String>> {
    let runtime = publish_runtime(limits)?;
    let name = file_label(path);
    let component = publish_component(&runtime, path)?;
    let artefacts = wit_artefacts(artefacts)?;
    tracing::info!(
        plugin = %name,
        config = config.redacted_json(),
        "publishing {} artefact(s) (network: {})",
        artefacts.len(),
        hosts_or_none(&config.allow_hosts)
    );
    let name: Arc<str> = name.into();
    let run = PublishRun {
        grant: NetGrant::new(
            name.clone(),
            config.allow_hosts.clone(),
            runtime.limits().timeout,
        ),
        name,
        secrets: config.secrets().clone(),
        config: config.plugin_json().to_string(),
        allowed: "not in --publish_config allow_hosts (add \"host:port\" there)",
    };
    run.publish(&runtime, &component, artefacts)
}

/// Reads `path` and checks it is a publish plugin this host can run (before any work starts).
pub fn check_plugin(path: &Path) -> Result<()> {
    publish_component(&publish_runtime(PluginLimits::default())?, path).map(|_| ())
}

fn publish_component(runtime: &PluginRuntime, path: &Path) -> Result<Component> {
    let wasm = std::fs::read(path).map_err(|e| {
        UsageError::new(format!(
            "--publish {}: cannot read it ({e}); pass a publish plugin .wasm component",
            path.display()
        ))
    })?;
    let name = file_label(path);
    let component = runtime.component(&name, &wasm)?;
    let found = world::detect(runtime.engine(), &component, &name)?;
    if found.kind != Kind::Publish {
        bail!(UsageError::new(format!(
            "--publish {name}: this is a {} plugin, not a publish plugin",
            found.kind
        )));
    }
    Ok(component)
}

/// A plugin call may run as long as it keeps reading file bytes: the deadline is one without
/// progress, at least [`MIN_IDLE`].
fn publish_runtime(limits: PluginLimits) -> Result<PluginRuntime> {
    PluginRuntime::new(PluginLimits {
        memory_mb: limits.memory_mb,
        timeout: limits.timeout.max(MIN_IDLE),
    })
}

fn wit_artefacts(artefacts: &[PushArtefact]) -> Result<Vec<wit_types::Artefact>> {
    artefacts.iter().map(wit_artefact).collect()
}

/// One publish: which plugin, what it may reach, what it must not print, its config.
struct PublishRun {
    name: Arc<str>,
    grant: NetGrant,
    secrets: Secrets,
    /// JSON text for `configure` (may hold secrets: never logged).
    config: String,
    /// How a refused request's authority is described ("… which is {allowed}").
    allowed: &'static str,
}

impl PublishRun {
    fn publish(
        self,
        runtime: &PluginRuntime,
        component: &Component,
        artefacts: Vec<wit_types::Artefact>,
    ) -> Result<Vec<String>> {
        let PublishRun {
            name,
            grant,
            secrets,
            config,
            allowed,
        } = self;
        let idle = runtime.limits().timeout;
        let pre = publish_pre(runtime, component, &name)?;
        let state = PublishState::new(
            runtime,
            name.clone(),
            grant,
            secrets,
            Handed {
                artefacts: artefacts.clone(),
            },
        );
        let mut store = state.into_store(runtime.engine(), idle);
        let trap = |store: &mut Store<PublishState>, e: wasmtime::Error| {
            let state = store.data();
            let why = if err_is_interrupt(&e) {
                format!("made no progress for {}s", idle.as_secs())
            } else {
                format!("failed ({})", e.root_cause())
            };
            anyhow::anyhow!(state.secrets.mask(&format!(
                "publish plugin {name} {why}{}",
                state.stderr_tail()
            )))
        };
        let bindings = pre
            .instantiate(&mut store)
            .map_err(|e| trap(&mut store, e))?;
        let steps = bindings.ferrotune_plugin_publish_steps();
        let configured = steps
            .call_configure(&mut store, &config)
            .map_err(|e| trap(&mut store, e))?;
        if let Err(e) = configured {
            bail!("{}", plugin_error(&store, e, allowed));
        }
        let published = steps
            .call_publish(&mut store, &artefacts)
            .map_err(|e| trap(&mut store, e))?;
        match published {
            Ok(urls) => Ok(urls),
            Err(e) => bail!("{}", plugin_error(&store, e, allowed)),
        }
    }
}

/// Describes a publish plugin without configuring it (for `ferrotune plugin inspect`).
pub fn describe_component(
    runtime: &PluginRuntime,
    name: &str,
    wasm: &[u8],
) -> Result<super::formatter::PluginInfo> {
    let component = runtime.component(name, wasm)?;
    let pre = publish_pre(runtime, &component, name)?;
    let name: Arc<str> = name.into();
    let timeout = runtime.limits().timeout;
    let state = PublishState::new(
        runtime,
        name.clone(),
        NetGrant::new(name, Vec::new(), timeout),
        Secrets::default(),
        Handed {
            artefacts: Vec::new(),
        },
    );
    let mut store = state.into_store(runtime.engine(), timeout);
    let bindings = pre.instantiate(&mut store).map_err(wasm_err)?;
    let info = bindings
        .ferrotune_plugin_publish_steps()
        .call_describe(&mut store)
        .map_err(wasm_err)?;
    Ok(super::formatter::PluginInfo {
        name: info.name,
        version: info.version,
        description: info.description,
        config_schema: info.config_schema,
    })
}

/// The component linked against this host's publish world, ready to instantiate per Store.
fn publish_pre(
    runtime: &PluginRuntime,
    component: &Component,
    name: &str,
) -> Result<v0_1_0::PublishPre<PublishState>> {
    publish_linker(runtime)?
        .instantiate_pre(component)
        .map_err(wasm_err)
        .and_then(|pre| v0_1_0::PublishPre::new(pre).map_err(wasm_err))
        .with_context(|| format!("{name} does not match this host's publish world"))
}

/// `host:port`s as a list for messages.
fn hosts_or_none(hosts: &[String]) -> String {
    if hosts.is_empty() {
        "none".to_string()
    } else {
        hosts.join(", ")
    }
}

fn err_is_interrupt(e: &wasmtime::Error) -> bool {
    e.downcast_ref::<Trap>() == Some(&Trap::Interrupt)
}

/// A plugin error in one line, secrets masked; a refused request in the host's words
/// (`allowed` says what the grant allows).
fn plugin_error(store: &Store<PublishState>, e: wit_types::PluginError, allowed: &str) -> String {
    let state = store.data();
    if let Some(authority) = state.grant.take_denied().first() {
        return format!(
            "the plugin tried to reach {authority}, which is {allowed} (allowed: {}); the host \
             refused it",
            hosts_or_none(state.grant.allowed())
        );
    }
    let m = match e {
        wit_types::PluginError::InvalidConfig(m)
        | wit_types::PluginError::NotFound(m)
        | wit_types::PluginError::Denied(m)
        | wit_types::PluginError::Other(m) => m,
    };
    state.secrets.mask(&m)
}

/// WASI (the sandbox's context: no files, sockets or env), `wasi:http` through [`NetGrant`],
/// the imports shared with the storage world, and the publish world's own.
fn publish_linker(runtime: &PluginRuntime) -> Result<Linker<PublishState>> {
    let mut linker = Linker::new(runtime.engine());
    net_state::add_shared_imports(&mut linker)?;
    host_export::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(wasm_err)?;
    open_artefact::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(wasm_err)?;
    Ok(linker)
}

/// Lists the files of `dir` named in `files` as an artefact (helper for callers that hold the
/// list of paths an export wrote).
pub fn artefact_of(kind: ArtefactKind, dir: &Path, files: &[PathBuf]) -> PushArtefact {
    PushArtefact {
        kind,
        dir: dir.to_path_buf(),
        files: files
            .iter()
            .filter_map(|f| f.strip_prefix(dir).ok())
            .map(|f| f.to_string_lossy().replace('\\', "/"))
            .collect(),
        quantization: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_give_authority_and_scheme() {
        assert_eq!(
            endpoint_authority("https://huggingface.co").unwrap(),
            ("huggingface.co:443".to_string(), "https")
        );
        assert_eq!(
            endpoint_authority("http://127.0.0.1:8123/").unwrap(),
            ("127.0.0.1:8123".to_string(), "http")
        );
        assert!(endpoint_authority("ftp://x").is_err());
    }

    #[test]
    fn artefacts_list_files_relative_to_their_dir() {
        let dir = Path::new("/out");
        let a = artefact_of(
            ArtefactKind::Gguf,
            dir,
            &[dir.join("m.Q8_0.gguf"), PathBuf::from("/elsewhere/x")],
        );
        assert_eq!(a.files, vec!["m.Q8_0.gguf".to_string()]);
    }
}
