//! Checkpoint directories as sync sees them: `checkpoint-N` names and the `manifest.json` that
//! the checkpoint writer puts in last (its types and checks are `crate::checkpoint`'s). A
//! checkpoint counts as valid only when its manifest parses and every file it lists has the
//! listed size and SHA-256, so sync also checks downloads before the trainer sees them.

use std::path::{Path, PathBuf};

pub use crate::checkpoint::manifest::{Manifest, MANIFEST};
/// The step of a `checkpoint-N` directory name.
pub use crate::checkpoint::step_of as checkpoint_step;

/// Parses a downloaded manifest (the checkpoint writer's format); every file it lists must also
/// be a valid storage key.
pub fn parse(bytes: &[u8], origin: &str) -> Result<Manifest, String> {
    let manifest = Manifest::parse(bytes).map_err(|e| format!("{origin}: {e:#}"))?;
    for path in manifest.files.keys() {
        crate::storage::key::check(path)
            .map_err(|e| format!("{origin}: bad file path in manifest ({e})"))?;
    }
    Ok(manifest)
}

/// Checks `dir` against its manifest; returns the manifest when every file matches.
pub fn verify_dir(dir: &Path) -> Result<Manifest, String> {
    let verified = Manifest::read(dir).and_then(|m| m.verify(dir, &[]).map(|()| m));
    verified.map_err(|e| format!("{}: {e:#}", dir.display()))
}

/// Newest local checkpoint that verifies.
pub fn newest_valid_local(output_dir: &Path) -> Option<(u64, PathBuf)> {
    let mut all = crate::checkpoint::list(output_dir).ok()?;
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

/// Test helper: writes a checkpoint directory with a correct manifest (written last).
#[cfg(test)]
pub fn write_test_checkpoint(output_dir: &Path, step: u64, files: &[(&str, &[u8])]) -> PathBuf {
    let dir = output_dir.join(format!("checkpoint-{step}"));
    let mut entries = serde_json::Map::new();
    for (name, body) in files {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, body).unwrap();
        let entry = crate::checkpoint::manifest::hash_file(&path).unwrap();
        entries.insert(name.to_string(), serde_json::to_value(entry).unwrap());
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
