//! Checkpoint directories as sync sees them: `checkpoint-N` names and the `manifest.json` that
//! the checkpoint writer (`crate::checkpoint`) puts in last. A checkpoint counts as valid only
//! when its manifest parses and every file it lists has the listed size and SHA-256. Sync reads
//! only the manifest's `files` map, so it also checks downloads before the trainer sees them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// File name of the manifest inside a checkpoint directory (written last).
pub const MANIFEST: &str = "manifest.json";

/// What sync reads from a manifest: the files, by name relative to the checkpoint directory.
/// Other keys (`format`, `version`, `global_step`) are the checkpoint writer's.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub files: BTreeMap<String, ManifestFile>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ManifestFile {
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
}

impl Manifest {
    pub fn parse(bytes: &[u8], origin: &str) -> Result<Self, String> {
        let manifest: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| format!("{origin}: not a checkpoint manifest ({e})"))?;
        for path in manifest.files.keys() {
            crate::storage::key::check(path)
                .map_err(|e| format!("{origin}: bad file path in manifest ({e})"))?;
            if path == MANIFEST {
                return Err(format!("{origin}: the manifest lists itself"));
            }
        }
        Ok(manifest)
    }
}

/// The step of a `checkpoint-N` directory name.
pub fn checkpoint_step(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("checkpoint-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `checkpoint-N` directories directly under `output_dir`, oldest first (a missing directory
/// has none).
pub fn local_checkpoints(output_dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(output_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        if let Some(step) = entry.file_name().to_str().and_then(checkpoint_step) {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Checks `dir` against its manifest; returns the manifest when every file matches.
pub fn verify_dir(dir: &Path) -> Result<Manifest, String> {
    let manifest_path = dir.join(MANIFEST);
    let bytes = std::fs::read(&manifest_path)
        .map_err(|e| format!("{}: cannot read ({e})", manifest_path.display()))?;
    let manifest = Manifest::parse(&bytes, &manifest_path.display().to_string())?;
    for (name, file) in &manifest.files {
        let path = dir.join(name);
        let (size, sha) = hash_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if size != file.size || sha != file.sha256 {
            return Err(format!(
                "{}: {size} bytes, SHA-256 {sha}; the manifest says {} bytes, {}",
                path.display(),
                file.size,
                file.sha256
            ));
        }
    }
    Ok(manifest)
}

/// Newest local checkpoint that verifies.
pub fn newest_valid_local(output_dir: &Path) -> Option<(u64, PathBuf)> {
    let mut all = local_checkpoints(output_dir).ok()?;
    all.reverse();
    all.into_iter().find(|(_, dir)| verify_dir(dir).is_ok())
}

/// Every regular file under `dir`, as `/`-separated relative paths, sorted.
pub fn files_under(dir: &Path) -> std::io::Result<Vec<String>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                walk(root, &entry.path(), out)?;
            } else if kind.is_file() {
                let rel = entry.path();
                let rel = rel.strip_prefix(root).expect("under root");
                out.push(
                    rel.to_string_lossy()
                        .replace(std::path::MAIN_SEPARATOR, "/"),
                );
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let size = std::io::copy(&mut file, &mut hasher)?;
    let sha = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((size, sha))
}

/// Test helper: writes a checkpoint directory with a correct manifest (written last).
#[cfg(test)]
pub fn write_test_checkpoint(output_dir: &Path, step: u64, files: &[(&str, &[u8])]) -> PathBuf {
    let dir = output_dir.join(format!("checkpoint-{step}"));
    let mut entries = serde_json::Map::new();
    for (name, body) in files {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, body).unwrap();
        let (size, sha256) = hash_file(&path).unwrap();
        entries.insert(
            name.to_string(),
            serde_json::json!({"size": size, "sha256": sha256}),
        );
    }
    let manifest = serde_json::json!({
        "format": "ferrotune-checkpoint", "version": 1, "global_step": step, "files": entries
    });
    std::fs::write(dir.join(MANIFEST), manifest.to_string()).unwrap();
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_come_from_exact_names() {
        assert_eq!(checkpoint_step("checkpoint-500"), Some(500));
        for bad in [
            "checkpoint-",
            "checkpoint-5x",
            "ckpt-5",
            "checkpoint--1",
            ".checkpoint-5",
        ] {
            assert_eq!(checkpoint_step(bad), None, "{bad}");
        }
    }

    #[test]
    fn verification_catches_changed_and_missing_files() {
        let out = tempfile::tempdir().unwrap();
        let dir = write_test_checkpoint(out.path(), 3, &[("a.bin", b"abc"), ("sub/b.json", b"{}")]);
        assert_eq!(verify_dir(&dir).unwrap().files.len(), 2);
        std::fs::write(dir.join("a.bin"), b"abd").unwrap();
        assert!(verify_dir(&dir).unwrap_err().contains("a.bin"));
        std::fs::remove_file(dir.join("a.bin")).unwrap();
        assert!(verify_dir(&dir).is_err());
        std::fs::remove_file(dir.join(MANIFEST)).unwrap();
        assert!(verify_dir(&dir).unwrap_err().contains("manifest.json"));
    }

    #[test]
    fn newest_valid_skips_broken_checkpoints() {
        let out = tempfile::tempdir().unwrap();
        write_test_checkpoint(out.path(), 2, &[("a", b"1")]);
        let broken = write_test_checkpoint(out.path(), 10, &[("a", b"2")]);
        std::fs::remove_file(broken.join(MANIFEST)).unwrap();
        assert_eq!(newest_valid_local(out.path()).unwrap().0, 2);
        assert_eq!(
            files_under(&broken).unwrap(),
            ["a"],
            "listing covers files only"
        );
    }
}
