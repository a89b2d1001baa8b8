//! The local Hugging Face hub cache (`huggingface_hub`'s layout): `REPO_TYPE--org--name/` with
//! `refs/main` naming the snapshot under `snapshots/<revision>/`, whose files link into `blobs/`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// What kind of hub repository an id names (the cache folder prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    fn prefix(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }
}

/// The hub cache directories to search, most specific first: `HF_HUB_CACHE`, `HF_HOME/hub`,
/// `XDG_CACHE_HOME/huggingface/hub`, `~/.cache/huggingface/hub` (duplicates removed).
pub fn hub_cache_dirs() -> Vec<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let mut dirs = Vec::new();
    if let Some(d) = env("HF_HUB_CACHE").or_else(|| env("HUGGINGFACE_HUB_CACHE")) {
        dirs.push(d);
    }
    if let Some(home) = env("HF_HOME") {
        dirs.push(home.join("hub"));
    }
    if let Some(xdg) = env("XDG_CACHE_HOME") {
        dirs.push(xdg.join("huggingface").join("hub"));
    }
    if let Some(home) = env("HOME") {
        dirs.push(home.join(".cache").join("huggingface").join("hub"));
    }
    dirs.dedup();
    dirs
}

/// Whether `id` has the shape of a hub id (`name` or `org/name`, no path syntax).
pub fn looks_like_repo_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split('/').collect();
    let ok_part = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    (1..=2).contains(&parts.len()) && parts.iter().all(|p| ok_part(p))
}

/// The cache folder name of a repo: `datasets--org--name`.
pub fn repo_folder(kind: RepoKind, id: &str) -> String {
    format!("{}--{}", kind.prefix(), id.replace('/', "--"))
}

/// The snapshot directory of `id` in the first cache dir that has one (`refs/main`'s revision,
/// else the most recently modified snapshot). `Ok(None)` when no cache has it.
pub fn find_snapshot(kind: RepoKind, id: &str, cache_dirs: &[PathBuf]) -> Result<Option<PathBuf>> {
    for dir in cache_dirs {
        let repo = dir.join(repo_folder(kind, id));
        if let Some(snapshot) = snapshot_of(&repo)? {
            return Ok(Some(snapshot));
        }
    }
    Ok(None)
}

fn snapshot_of(repo: &Path) -> Result<Option<PathBuf>> {
    let snapshots = repo.join("snapshots");
    if !snapshots.is_dir() {
        return Ok(None);
    }
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let dir = snapshots.join(rev.trim());
        if dir.is_dir() {
            return Ok(Some(dir));
        }
    }
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(&snapshots)
        .with_context(|| format!("{}: cannot list", snapshots.display()))?
    {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let modified = entry.metadata()?.modified()?;
        if newest.as_ref().is_none_or(|(t, _)| modified > *t) {
            newest = Some((modified, entry.path()));
        }
    }
    Ok(newest.map(|(_, p)| p))
}

/// Where the `datasets` library keeps its Arrow cache (`HF_DATASETS_CACHE`, else
/// `HF_HOME/datasets`, else `~/.cache/huggingface/datasets`).
pub fn datasets_library_cache() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("HF_DATASETS_CACHE")
        .or_else(|| env("HF_HOME").map(|h| h.join("datasets")))
        .or_else(|| env("HOME").map(|h| h.join(".cache").join("huggingface").join("datasets")))
}

/// The `datasets` library's folder for `id` (`org___name`), if it exists.
pub fn in_datasets_library_cache(id: &str) -> Option<PathBuf> {
    let dir = datasets_library_cache()?.join(id.replace('/', "___"));
    dir.is_dir().then_some(dir)
}
