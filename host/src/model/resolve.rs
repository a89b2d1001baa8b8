//! `--model_name` → a local model directory (or GGUF file).
//!
//! Accepted forms, in order: an existing directory; a `.gguf` file, dequantised once into a model
//! directory in ferrotune's cache ([`super::gguf_base`]); an `org/name` id found in the
//! local Hugging Face hub cache (`models--org--name/refs/main` → `snapshots/<rev>/`); with
//! `UNSLOTH_USE_MODELSCOPE=true`, an `org/name` id in ModelScope's local cache instead. An `org/name`
//! id that is not cached is downloaded from the Hugging Face Hub into that cache ([`crate::hub`])
//! unless `HF_HUB_OFFLINE` is set; when that fails too, one line names every place it looked and
//! why the download failed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The environment the resolver reads, separated out so tests need not mutate process env.
#[derive(Debug, Clone, Default)]
pub struct CacheEnv {
    pub hf_hub_cache: Option<PathBuf>,
    pub hf_home: Option<PathBuf>,
    pub use_modelscope: bool,
    pub modelscope_cache: Option<PathBuf>,
    pub home: Option<PathBuf>,
    /// The Hub to download from on a cache miss (`HF_ENDPOINT`, else huggingface.co); `None`
    /// means no downloads (`HF_HUB_OFFLINE`, and tests that must not touch the network).
    pub hub_endpoint: Option<String>,
    pub hf_token: Option<String>,
    /// `XDG_CACHE_HOME`: ferrotune's own cache (dequantised GGUF base models) lives under it.
    pub xdg_cache_home: Option<PathBuf>,
}

impl CacheEnv {
    /// Reads `HF_HUB_CACHE`, `HF_HOME`, `UNSLOTH_USE_MODELSCOPE`, `MODELSCOPE_CACHE`, `HOME`,
    /// `HF_ENDPOINT`, `HF_HUB_OFFLINE` and the token ([`crate::hub::token_from_env`]).
    pub fn from_process() -> Self {
        let path = |key: &str| {
            std::env::var_os(key)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        CacheEnv {
            hf_hub_cache: path("HF_HUB_CACHE"),
            hf_home: path("HF_HOME"),
            use_modelscope: crate::hub::env_flag("UNSLOTH_USE_MODELSCOPE"),
            modelscope_cache: path("MODELSCOPE_CACHE"),
            home: path("HOME"),
            hub_endpoint: crate::hub::endpoint_from_env(),
            hf_token: crate::hub::token_from_env(),
            xdg_cache_home: path("XDG_CACHE_HOME"),
        }
    }

    /// Where GGUF base models are dequantised to: `XDG_CACHE_HOME/ferrotune/gguf`, else
    /// `~/.cache/ferrotune/gguf`.
    pub fn gguf_cache_dir(&self) -> Option<PathBuf> {
        self.xdg_cache_home
            .clone()
            .or_else(|| self.home.as_ref().map(|h| h.join(".cache")))
            .map(|c| c.join("ferrotune").join("gguf"))
    }

    /// Hugging Face's hub cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
    pub fn hf_hub_dir(&self) -> Option<PathBuf> {
        self.hf_hub_cache
            .clone()
            .or_else(|| self.hf_home.as_ref().map(|h| h.join("hub")))
            .or_else(|| self.home.as_ref().map(|h| h.join(".cache/huggingface/hub")))
    }

    /// ModelScope's cache root: `MODELSCOPE_CACHE`, else `~/.cache/modelscope/hub`.
    pub fn modelscope_dir(&self) -> Option<PathBuf> {
        self.modelscope_cache
            .clone()
            .or_else(|| self.home.as_ref().map(|h| h.join(".cache/modelscope/hub")))
    }
}

/// Resolves `--model_name` with the process environment.
pub fn resolve_model(model_name: &str) -> Result<PathBuf> {
    resolve_model_with(model_name, &CacheEnv::from_process())
}

/// Resolves `--model_name` with an explicit environment.
pub fn resolve_model_with(model_name: &str, env: &CacheEnv) -> Result<PathBuf> {
    let as_path = Path::new(model_name);
    if as_path.is_dir() {
        return Ok(as_path.to_path_buf());
    }
    if as_path.is_file() && is_gguf(as_path) {
        let Some(cache) = env.gguf_cache_dir() else {
            bail!("--model_name {model_name}: a GGUF base model is dequantised into a cache, but neither XDG_CACHE_HOME nor HOME is set");
        };
        return super::gguf_base::materialise(as_path, &cache)
            .with_context(|| format!("--model_name {model_name}: cannot use this GGUF file"));
    }
    if as_path.is_file() {
        bail!("--model_name {model_name}: a file that is not .gguf; pass a model directory, a .gguf file or an org/name id");
    }
    let Some((org, name)) = split_repo_id(model_name) else {
        bail!(
            "--model_name {model_name}: no such directory or .gguf file, and not an org/name model id"
        );
    };
    let mut looked = Vec::new();
    if env.use_modelscope {
        if let Some(root) = env.modelscope_dir() {
            // ModelScope has used both `<root>/<org>/<name>` and `<root>/models/<org>/<name>`.
            for dir in [
                root.join(org).join(name),
                root.join("models").join(org).join(name),
            ] {
                if dir.join("config.json").is_file() {
                    return Ok(dir);
                }
                looked.push(dir);
            }
        }
        bail!(
            "--model_name {model_name}: not in the ModelScope cache (UNSLOTH_USE_MODELSCOPE=true; looked in {}); \
             download it with `modelscope download {model_name}` or pass a local directory",
            list(&looked)
        );
    }
    let hub_dir = env.hf_hub_dir();
    if let Some(hub) = &hub_dir {
        let repo = hub.join(format!("models--{org}--{name}"));
        if let Some(snapshot) = hf_snapshot(&repo) {
            return Ok(snapshot);
        }
        looked.push(repo);
    }
    let download = match (&env.hub_endpoint, &hub_dir) {
        (None, _) => "downloads are off (HF_HUB_OFFLINE)".to_string(),
        (Some(_), None) => "no cache to download into (set HF_HOME)".to_string(),
        (Some(endpoint), Some(hub)) => {
            let client = crate::hub::Hub::new(endpoint, env.hf_token.clone());
            tracing::info!("--model_name {model_name}: not cached; downloading from {endpoint}");
            match client.download_model(&format!("{org}/{name}"), hub) {
                Ok(snapshot) => return Ok(snapshot),
                Err(e) => format!("downloading from {endpoint} failed: {e:#}"),
            }
        }
    };
    bail!(
        "--model_name {model_name}: not a local directory and not in the Hugging Face cache (looked in {}; \
         set HF_HUB_CACHE or HF_HOME to move it), and {download}; fetch it first \
         (`huggingface-cli download {model_name}`) or pass a local model directory",
        list(&looked)
    )
}

fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// `org/name` with two non-empty, path-safe parts.
fn split_repo_id(id: &str) -> Option<(&str, &str)> {
    let (org, name) = id.split_once('/')?;
    let ok = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    (ok(org) && ok(name)).then_some((org, name))
}

/// The snapshot `refs/main` points at; without that ref, the only snapshot holding a config.json.
fn hf_snapshot(repo: &Path) -> Option<PathBuf> {
    let snapshots = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let dir = snapshots.join(rev.trim());
        if dir.join("config.json").is_file() {
            return Some(dir);
        }
    }
    let mut with_config: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").is_file())
        .collect();
    (with_config.len() == 1).then(|| with_config.remove(0))
}

fn list(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "nowhere: no HOME or cache variable is set".to_string();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(hub: &Path, repo: &str, rev: &str, with_ref: bool) -> PathBuf {
        let base = hub.join(repo);
        let snap = base.join("snapshots").join(rev);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        if with_ref {
            std::fs::create_dir_all(base.join("refs")).unwrap();
            std::fs::write(base.join("refs/main"), format!("{rev}\n")).unwrap();
        }
        snap
    }

    #[test]
    fn hf_cache_follows_refs_main_in_hub_cache_then_hf_home_then_home() {
        let tmp = tempfile::tempdir().unwrap();
        let hub = tmp.path().join("hubcache");
        snapshot(&hub, "models--org--name", "old", false);
        let main = snapshot(&hub, "models--org--name", "abc123", true);
        let env = CacheEnv {
            hf_hub_cache: Some(hub.clone()),
            hf_home: Some(tmp.path().join("unused")),
            ..Default::default()
        };
        assert_eq!(resolve_model_with("org/name", &env).unwrap(), main);

        let home_hub = tmp.path().join("hfhome/hub");
        let only = snapshot(&home_hub, "models--a--b", "r1", false);
        let env = CacheEnv {
            hf_home: Some(tmp.path().join("hfhome")),
            ..Default::default()
        };
        assert_eq!(resolve_model_with("a/b", &env).unwrap(), only);

        let user_hub = tmp.path().join("user/.cache/huggingface/hub");
        let snap = snapshot(&user_hub, "models--c--d", "r2", true);
        let env = CacheEnv {
            home: Some(tmp.path().join("user")),
            ..Default::default()
        };
        assert_eq!(resolve_model_with("c/d", &env).unwrap(), snap);
    }

    #[test]
    fn local_directories_win_and_missing_ids_name_where_they_looked() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_str().unwrap();
        assert_eq!(
            resolve_model_with(dir, &CacheEnv::default()).unwrap(),
            tmp.path()
        );
        let env = CacheEnv {
            hf_hub_cache: Some(tmp.path().join("hub")),
            ..Default::default()
        };
        let err = resolve_model_with("meta/llama", &env)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("models--meta--llama") && err.contains("downloads are off"),
            "{err}"
        );
        let err = resolve_model_with("not an id", &env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not an org/name"), "{err}");
    }

    #[test]
    fn modelscope_cache_is_used_when_asked() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ms/models/qwen/tiny");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        let env = CacheEnv {
            use_modelscope: true,
            modelscope_cache: Some(tmp.path().join("ms")),
            ..Default::default()
        };
        assert_eq!(resolve_model_with("qwen/tiny", &env).unwrap(), dir);
        let err = resolve_model_with("qwen/other", &env)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ModelScope") && err.contains("qwen/other"),
            "{err}"
        );
    }
}
