//! Local-file halves of a transfer shared by the backends: downloads go to a temporary sibling
//! that is fsynced and renamed into place, so a reader never sees a partial file.

use std::fs::File;
use std::path::Path;

use super::StorageError;

/// Name prefix of in-flight temporary files; listings of a `file://` store skip them.
pub const PARTIAL_PREFIX: &str = ".ferrotune-partial-";

/// A temporary file next to `dest` that becomes `dest` on [`Partial::commit`] and disappears
/// if dropped uncommitted.
pub struct Partial {
    file: tempfile::NamedTempFile,
    dest: std::path::PathBuf,
}

impl Partial {
    pub fn new(dest: &Path) -> Result<Self, StorageError> {
        let parent = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)
            .map_err(|e| StorageError::local("cannot create directory", parent, e))?;
        let file = tempfile::Builder::new()
            .prefix(PARTIAL_PREFIX)
            .tempfile_in(parent)
            .map_err(|e| StorageError::local("cannot create a file in", parent, e))?;
        Ok(Partial {
            file,
            dest: dest.to_path_buf(),
        })
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_file_mut()
    }

    /// Fsyncs the data, renames it over `dest` and fsyncs the directory so the rename survives a
    /// power loss.
    pub fn commit(self) -> Result<(), StorageError> {
        let dest = self.dest;
        self.file
            .as_file()
            .sync_all()
            .map_err(|e| StorageError::local("cannot fsync", &dest, e))?;
        self.file
            .persist(&dest)
            .map_err(|e| StorageError::local("cannot rename into place", &dest, e.error))?;
        if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent);
        }
        Ok(())
    }
}

/// Best effort: some file systems refuse to fsync a directory, which loses nothing on them.
pub fn sync_dir(dir: &Path) {
    if let Ok(handle) = File::open(dir) {
        let _ = handle.sync_all();
    }
}

/// The size of a local file, as the error callers want.
pub fn local_size(path: &Path) -> Result<u64, StorageError> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| StorageError::local("cannot read", path, e))
}
