//! Directories that appear whole or not at all: files are written into a hidden sibling
//! (`.NAME.tmp-PID`), each fsynced, then the directory is fsynced and renamed into place and the
//! parent fsynced. A process killed mid-write leaves only the hidden sibling, which
//! [`clean_leftovers`] removes on the next start.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

const TMP_MARK: &str = ".tmp-";
const OLD_MARK: &str = ".old-";

/// A directory being written next to its final place.
pub struct StagingDir {
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl StagingDir {
    pub fn create(target: &Path) -> Result<Self> {
        let parent = parent_of(target);
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("{}: cannot create directory", parent.display()))?;
        let tmp = sibling(target, TMP_MARK);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .with_context(|| format!("{}: cannot remove stale directory", tmp.display()))?;
        }
        std::fs::create_dir(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        Ok(Self {
            tmp,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    /// Where files are staged.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Writes and fsyncs one file of the staged directory.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        write_synced(&self.tmp.join(name), bytes)
    }

    /// Moves the staged directory into place, replacing an existing one of the same name.
    pub fn commit(mut self) -> Result<PathBuf> {
        sync_dir(&self.tmp)?;
        let old = sibling(&self.target, OLD_MARK);
        let replacing = self.target.exists();
        if replacing {
            if old.exists() {
                std::fs::remove_dir_all(&old)?;
            }
            std::fs::rename(&self.target, &old)
                .with_context(|| format!("{}: cannot move aside", self.target.display()))?;
        }
        std::fs::rename(&self.tmp, &self.target).with_context(|| {
            format!(
                "cannot rename {} to {}",
                self.tmp.display(),
                self.target.display()
            )
        })?;
        self.committed = true;
        sync_dir(&parent_of(&self.target))?;
        if replacing {
            std::fs::remove_dir_all(&old)
                .with_context(|| format!("{}: cannot remove", old.display()))?;
        }
        Ok(self.target.clone())
    }
}

impl Drop for StagingDir {
    /// A save that failed (error or panic) leaves nothing behind.
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Writes `bytes` to `path` and fsyncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file =
        File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .with_context(|| format!("{}: cannot write", path.display()))
}

/// Replaces the file at `path` atomically (temp file in the same directory, fsync, rename).
pub fn replace_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent_of(path).join(format!(".{name}{TMP_MARK}{}", std::process::id()));
    write_synced(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    sync_dir(&parent_of(path))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("{}: cannot fsync directory", dir.display()))
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn sibling(target: &Path, mark: &str) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent_of(target).join(format!(".{name}{mark}{}", std::process::id()))
}

/// Removes what interrupted saves left in `dir` (hidden `.NAME.tmp-PID` / `.NAME.old-PID`
/// entries); returns what it removed.
pub fn clean_leftovers(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot list", dir.display())),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && (name.contains(TMP_MARK) || name.contains(OLD_MARK)) {
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            }
            .with_context(|| format!("{}: cannot remove leftover", path.display()))?;
            removed.push(path);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_directory_appears_only_on_commit_and_replaces_the_old_one() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("checkpoint-2");
        let staged = StagingDir::create(&target).unwrap();
        staged.write("a.txt", b"one").unwrap();
        assert!(!target.exists());
        staged.commit().unwrap();
        assert_eq!(std::fs::read(target.join("a.txt")).unwrap(), b"one");

        let again = StagingDir::create(&target).unwrap();
        again.write("b.txt", b"two").unwrap();
        again.commit().unwrap();
        assert!(!target.join("a.txt").exists());
        assert_eq!(std::fs::read(target.join("b.txt")).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no leftovers beside the checkpoint");
    }

    #[test]
    fn dropped_stage_leaves_nothing_and_leftovers_are_cleaned() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("checkpoint-4");
        {
            let staged = StagingDir::create(&target).unwrap();
            staged.write("a.txt", b"x").unwrap();
        }
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
        // What a killed process leaves: a hidden temp dir from another pid.
        let stale = root.path().join(".checkpoint-6.tmp-99999");
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join("adapter_model.safetensors"), b"partial").unwrap();
        std::fs::create_dir(root.path().join("checkpoint-2")).unwrap();
        let removed = clean_leftovers(root.path()).unwrap();
        assert_eq!(removed, vec![stale.clone()]);
        assert!(!stale.exists());
        assert!(root.path().join("checkpoint-2").exists());
    }

    #[test]
    fn replace_file_swaps_contents_whole() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("x.json");
        replace_file(&file, b"1").unwrap();
        replace_file(&file, b"22").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"22");
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
    }
}
