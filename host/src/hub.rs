//! Downloads a model or dataset from the Hugging Face Hub into the standard local cache, so an
//! `--model_name org/name` or `--dataset org/name` that is not cached yet works as it does with
//! transformers and datasets.
//!
//! What it talks to: `GET {HF_ENDPOINT}/api/{models|datasets}/{id}` (the revision sha and the
//! file list) and `GET {HF_ENDPOINT}/[datasets/]{id}/resolve/{sha}/{file}` (each file; redirects
//! to a CDN are followed).
//! The caller passes `HF_ENDPOINT` (default `https://huggingface.co`) and `HF_TOKEN` (or the token
//! of `huggingface-cli login`, [`token_from_env`]), sent as a bearer token; `HF_HUB_OFFLINE=1`
//! turns downloads off (`crate::model::resolve`).
//!
//! Where it writes: `HUB/{models|datasets}--org--name/snapshots/<sha>/<file>` and `refs/main`,
//! huggingface_hub's layout, so transformers finds the files too (as plain files, not links into
//! `blobs/`, which huggingface_hub also reads). Every file is written to a temporary name and
//! renamed into place, `refs/main` last (and for a model `config.json` just before it, as the
//! model lookup takes a snapshot with a config.json as complete): a download cut short never
//! looks like a complete snapshot, and a second run fetches only what is missing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Files of a model repository the trainer reads, besides the weights.
const MODEL_FILES: [&str; 6] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "config.json",
];
const WEIGHTS: &str = "model.safetensors";
const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// A Hub endpoint and the credentials for it.
#[derive(Debug, Clone)]
pub struct Hub {
    endpoint: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Hub {
    /// The Hub at `endpoint` (`HF_ENDPOINT`), with an optional bearer token (`HF_TOKEN`).
    pub fn new(endpoint: &str, token: Option<String>) -> Self {
        let config = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(15)))
            // Until the answer's headers; no limit on the body (shards are gigabytes).
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .http_status_as_error(false)
            .user_agent(concat!("ferrotune/", env!("CARGO_PKG_VERSION")))
            .build();
        Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.is_empty()),
            agent: config.into(),
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The Hub the environment names, or `None` when downloads are off (`HF_HUB_OFFLINE`).
    pub fn from_env() -> Option<Self> {
        endpoint_from_env().map(|endpoint| Hub::new(&endpoint, token_from_env()))
    }

    /// Downloads what training needs from model repo `id` (`org/name`) into `hub_cache` and
    /// returns the snapshot directory.
    pub fn download_model(&self, id: &str, hub_cache: &Path) -> Result<PathBuf> {
        let repo = Repo::new(Kind::Model, id, hub_cache);
        let info = self.info(&repo)?;
        let snapshot = repo.snapshot(&info.sha)?;
        let has = |f: &str| info.files.iter().any(|s| s == f);
        if !has("config.json") {
            bail!(
                "{id} on {} has no config.json; is it a transformers model?",
                self.endpoint
            );
        }
        let mut weights = Vec::new();
        if has(WEIGHTS_INDEX) {
            let index = self.fetch(&repo, &info.sha, WEIGHTS_INDEX, &snapshot)?;
            weights.extend(shards_of(&index)?);
        } else if has(WEIGHTS) {
            weights.push(WEIGHTS.to_string());
        } else {
            bail!(
                "{id} on {} has no model.safetensors (or index); ferrotune loads safetensors \
                 weights only",
                self.endpoint
            );
        }
        for file in &weights {
            self.fetch(&repo, &info.sha, file, &snapshot)?;
        }
        // config.json last: the cache lookup takes a snapshot with a config.json as complete.
        for file in MODEL_FILES.iter().filter(|f| has(f)) {
            self.fetch(&repo, &info.sha, file, &snapshot)?;
        }
        repo.point_main_at(&info.sha)?;
        Ok(snapshot)
    }

    /// Downloads the data files of dataset repo `id` (those `wanted` accepts: the formats the
    /// pipeline reads) into `hub_cache` and returns the snapshot directory.
    pub fn download_dataset(
        &self,
        id: &str,
        hub_cache: &Path,
        wanted: impl Fn(&str) -> bool,
    ) -> Result<PathBuf> {
        let repo = Repo::new(Kind::Dataset, id, hub_cache);
        let info = self.info(&repo)?;
        let files: Vec<&String> = info.files.iter().filter(|f| wanted(f)).collect();
        if files.is_empty() {
            bail!(
                "dataset {id} on {} has no data file ferrotune reads (of {} files)",
                self.endpoint,
                info.files.len()
            );
        }
        let snapshot = repo.snapshot(&info.sha)?;
        for file in files {
            self.fetch(&repo, &info.sha, file, &snapshot)?;
        }
        repo.point_main_at(&info.sha)?;
        Ok(snapshot)
    }

    fn info(&self, repo: &Repo) -> Result<RepoInfo> {
        let id = &repo.id;
        let url = format!("{}/api/{}/{id}", self.endpoint, repo.kind.plural());
        let mut response = self.get(&url)?;
        check_status(response.status().as_u16(), id, &url)?;
        let text = response
            .body_mut()
            .read_to_string()
            .with_context(|| format!("{url}: cannot read the answer"))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{url}: not JSON"))?;
        let sha = json["sha"]
            .as_str()
            .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric()))
            .with_context(|| format!("{url}: the answer has no revision sha"))?
            .to_string();
        let files = json["siblings"]
            .as_array()
            .with_context(|| format!("{url}: the answer lists no files (siblings)"))?
            .iter()
            .filter_map(|s| s["rfilename"].as_str().map(str::to_string))
            .collect();
        Ok(RepoInfo { sha, files })
    }

    /// Downloads `file` of `repo` at `sha` into `snapshot` (kept when already there) and returns
    /// its path.
    fn fetch(&self, repo: &Repo, sha: &str, file: &str, snapshot: &Path) -> Result<PathBuf> {
        let id = &repo.id;
        // Names come from the server: never let one point outside the snapshot.
        let inside = Path::new(file)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !inside || file.is_empty() {
            bail!("{id}: the Hub lists {file:?}, which is not a plain relative file name");
        }
        let dest = snapshot.join(file);
        if dest.is_file() {
            return Ok(dest);
        }
        let dir = dest.parent().unwrap_or(snapshot);
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let url = format!(
            "{}/{}{id}/resolve/{sha}/{file}",
            self.endpoint,
            repo.kind.url_prefix()
        );
        let mut response = self.get(&url)?;
        check_status(response.status().as_u16(), id, &url)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{}.", file.rsplit('/').next().unwrap_or(file)))
            .suffix(".part")
            .tempfile_in(dir)
            .with_context(|| format!("{}: cannot create a temporary file", dir.display()))?;
        let bytes = std::io::copy(&mut response.body_mut().as_reader(), tmp.as_file_mut())
            .with_context(|| format!("{url}: download interrupted"))?;
        tmp.as_file_mut().flush()?;
        tmp.as_file().sync_all()?;
        tmp.persist(&dest)
            .with_context(|| format!("{}: cannot move into place", dest.display()))?;
        tracing::info!("downloaded {id}/{file} ({bytes} bytes)");
        Ok(dest)
    }

    fn get(&self, url: &str) -> Result<ureq::http::Response<ureq::Body>> {
        let mut request = self.agent.get(url);
        if let Some(token) = &self.token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        request
            .call()
            .with_context(|| format!("cannot reach {url} (offline? set HF_ENDPOINT for a mirror)"))
    }
}

struct RepoInfo {
    sha: String,
    files: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Model,
    Dataset,
}

impl Kind {
    /// In API paths and cache folder names.
    fn plural(self) -> &'static str {
        match self {
            Kind::Model => "models",
            Kind::Dataset => "datasets",
        }
    }

    /// Before the id in file URLs.
    fn url_prefix(self) -> &'static str {
        match self {
            Kind::Model => "",
            Kind::Dataset => "datasets/",
        }
    }
}

/// One repository and its folder in the hub cache.
struct Repo {
    kind: Kind,
    id: String,
    dir: PathBuf,
}

impl Repo {
    fn new(kind: Kind, id: &str, hub_cache: &Path) -> Self {
        let dir = hub_cache.join(format!("{}--{}", kind.plural(), id.replace('/', "--")));
        Repo {
            kind,
            id: id.to_string(),
            dir,
        }
    }

    fn snapshot(&self, sha: &str) -> Result<PathBuf> {
        let snapshot = self.dir.join("snapshots").join(sha);
        std::fs::create_dir_all(&snapshot)
            .with_context(|| format!("{}: cannot create", snapshot.display()))?;
        Ok(snapshot)
    }

    /// `refs/main` = `sha`, written last: it is what makes the snapshot the current one.
    fn point_main_at(&self, sha: &str) -> Result<()> {
        let refs = self.dir.join("refs");
        std::fs::create_dir_all(&refs)
            .with_context(|| format!("{}: cannot create", refs.display()))?;
        crate::checkpoint::atomic::replace_file(&refs.join("main"), sha.as_bytes())
    }
}

/// Whether a boolean environment variable is on (`1`, `true`, `yes`, `on`, any case), as
/// huggingface_hub reads its flags.
pub fn env_flag(key: &str) -> bool {
    std::env::var(key)
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// Where to download from: `HF_ENDPOINT` (default `https://huggingface.co`), or `None` when
/// `HF_HUB_OFFLINE` turns downloads off.
pub fn endpoint_from_env() -> Option<String> {
    (!env_flag("HF_HUB_OFFLINE")).then(|| {
        std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "https://huggingface.co".into())
    })
}

fn check_status(status: u16, id: &str, url: &str) -> Result<()> {
    match status {
        200..=299 => Ok(()),
        401 | 403 => bail!(
            "{url}: HTTP {status}; {id} is gated or private: accept its licence on the Hub and \
             set HF_TOKEN to a token that may read it"
        ),
        404 => bail!("{url}: HTTP 404; no such repository or file (check the id {id})"),
        _ => bail!("{url}: HTTP {status}"),
    }
}

/// The shard files a `model.safetensors.index.json` names, in order, each once.
fn shards_of(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("{}: cannot read", index.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", index.display()))?;
    let map = json["weight_map"]
        .as_object()
        .with_context(|| format!("{}: no weight_map", index.display()))?;
    let mut shards: Vec<String> = Vec::new();
    for file in map.values().filter_map(|v| v.as_str()) {
        let safe = Path::new(file)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !safe {
            bail!(
                "{}: shard name {file:?} is not a plain file name",
                index.display()
            );
        }
        if !shards.iter().any(|s| s == file) {
            shards.push(file.to_string());
        }
    }
    Ok(shards)
}

/// `HF_TOKEN`, else `HUGGING_FACE_HUB_TOKEN`, else the token file `huggingface-cli login` wrote
/// (`HF_TOKEN_PATH`, else `HF_HOME/token`, else `~/.cache/huggingface/token`).
pub fn token_from_env() -> Option<String> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    if let Some(token) = var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")) {
        return Some(token.trim().to_string());
    }
    let file = var("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .or_else(|| var("HF_HOME").map(|h| PathBuf::from(h).join("token")))
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/token")))?;
    let token = std::fs::read_to_string(file).ok()?;
    Some(token.trim().to_string()).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_lists_are_deduplicated_and_path_safe() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join(WEIGHTS_INDEX);
        std::fs::write(
            &index,
            r#"{"weight_map": {"a": "model-00001-of-00002.safetensors",
                "b": "model-00002-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        assert_eq!(
            shards_of(&index).unwrap(),
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
        std::fs::write(&index, r#"{"weight_map": {"a": "../evil"}}"#).unwrap();
        assert!(shards_of(&index).is_err());
    }

    #[test]
    fn endpoints_lose_their_trailing_slash_and_empty_tokens_are_none() {
        let hub = Hub::new("http://mirror:8080/", Some(String::new()));
        assert_eq!(hub.endpoint(), "http://mirror:8080");
        assert!(hub.token.is_none());
    }
}
