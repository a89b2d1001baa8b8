//! `file:///dir`: a directory as an object store (tests, NFS mounts, a local mirror). Keys map
//! to relative paths; writes are atomic (temporary sibling + fsync + rename).

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use super::transfer::{local_size, sync_dir, Partial, PARTIAL_PREFIX};
use super::{key, ObjectInfo, ObjectStore, StorageError};

pub struct FileStore {
    root: PathBuf,
    url: String,
}

impl FileStore {
    /// Opens (creating if needed) the directory `root`.
    pub fn new(root: PathBuf) -> Result<Self, StorageError> {
        std::fs::create_dir_all(&root)
            .map_err(|e| StorageError::local("cannot create storage directory", &root, e))?;
        let url = format!("file://{}", root.display());
        Ok(FileStore { root, url })
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, StorageError> {
        key::check(key)?;
        Ok(self.root.join(key))
    }

    fn info(&self, key: &str, path: &Path) -> Result<Option<ObjectInfo>, StorageError> {
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_file() => Ok(Some(ObjectInfo {
                key: key.to_string(),
                size: meta.len(),
                etag: None,
                modified_ms: meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_millis() as u64),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StorageError::local("cannot stat", path, e)),
        }
    }

    /// Walks `dir` collecting files whose key starts with `prefix`.
    fn walk(
        &self,
        dir: &Path,
        prefix: &str,
        out: &mut Vec<ObjectInfo>,
    ) -> Result<(), StorageError> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StorageError::local("cannot list", dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| StorageError::local("cannot list", dir, e))?;
            let path = entry.path();
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(PARTIAL_PREFIX) {
                continue;
            }
            let rel = path
                .strip_prefix(&self.root)
                .expect("walk stays under the root")
                .to_string_lossy()
                .replace(std::path::MAIN_SEPARATOR, "/");
            let file_type = entry
                .file_type()
                .map_err(|e| StorageError::local("cannot stat", &path, e))?;
            if file_type.is_dir() {
                // Descend only where keys below can still match the prefix.
                let dir_key = format!("{rel}/");
                if dir_key.starts_with(prefix) || prefix.starts_with(&dir_key) {
                    self.walk(&path, prefix, out)?;
                }
            } else if rel.starts_with(prefix) {
                if let Some(info) = self.info(&rel, &path)? {
                    out.push(info);
                }
            }
        }
        Ok(())
    }
}

impl ObjectStore for FileStore {
    fn url(&self) -> &str {
        &self.url
    }

    fn put_file(&self, key: &str, src: &Path) -> Result<ObjectInfo, StorageError> {
        let dest = self.path_of(key)?;
        let size = local_size(src)?;
        let mut partial = Partial::new(&dest)?;
        let mut reader =
            std::fs::File::open(src).map_err(|e| StorageError::local("cannot read", src, e))?;
        let copied = std::io::copy(&mut reader, partial.file())
            .map_err(|e| StorageError::local("cannot copy", src, e))?;
        if copied != size {
            return Err(StorageError::Integrity(format!(
                "{}: {} changed while uploading ({size} bytes, copied {copied})",
                self.url,
                src.display()
            )));
        }
        partial.commit()?;
        self.info(key, &dest)?.ok_or_else(|| {
            StorageError::Integrity(format!("{}/{key} vanished after writing", self.url))
        })
    }

    fn get_file(&self, key: &str, dest: &Path) -> Result<ObjectInfo, StorageError> {
        let src = self.path_of(key)?;
        let info = self
            .info(key, &src)?
            .ok_or_else(|| StorageError::NotFound(format!("{}/{key}: no such object", self.url)))?;
        let mut partial = Partial::new(dest)?;
        let mut reader =
            std::fs::File::open(&src).map_err(|e| StorageError::local("cannot read", &src, e))?;
        let copied = std::io::copy(&mut reader, partial.file())
            .map_err(|e| StorageError::local("cannot write", dest, e))?;
        if copied != info.size {
            return Err(StorageError::Integrity(format!(
                "{}/{key}: got {copied} of {} bytes",
                self.url, info.size
            )));
        }
        partial.commit()?;
        Ok(info)
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        key::check_prefix(prefix)?;
        let mut out = Vec::new();
        self.walk(&self.root, prefix, &mut out)?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = self.path_of(key)?;
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StorageError::local("cannot delete", &path, e)),
        }
        // Remove directories the delete left empty, as an object store has no directories.
        let mut dir = path.parent();
        while let Some(d) = dir.filter(|d| *d != self.root && d.starts_with(&self.root)) {
            if std::fs::remove_dir(d).is_err() {
                break;
            }
            dir = d.parent();
        }
        if let Some(parent) = path.parent() {
            sync_dir(parent);
        }
        Ok(())
    }

    fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        let path = self.path_of(key)?;
        self.info(key, &path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, FileStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("store")).unwrap();
        (dir, store)
    }

    #[test]
    fn put_get_list_head_delete_round_trip() {
        let (dir, store) = store();
        let src = dir.path().join("src.bin");
        std::fs::write(&src, b"hello storage").unwrap();
        let put = store.put_file("ck-1/a.bin", &src).unwrap();
        assert_eq!(put.size, 13);
        store.put_file("ck-1/sub/b.bin", &src).unwrap();
        store.put_file("ck-10/a.bin", &src).unwrap();

        let keys = |p: &str| -> Vec<String> {
            store.list(p).unwrap().into_iter().map(|o| o.key).collect()
        };
        assert_eq!(keys("ck-1/"), ["ck-1/a.bin", "ck-1/sub/b.bin"]);
        assert_eq!(
            keys("ck-1"),
            ["ck-1/a.bin", "ck-1/sub/b.bin", "ck-10/a.bin"]
        );
        assert_eq!(keys("").len(), 3);

        let dest = dir.path().join("out/got.bin");
        store.get_file("ck-1/sub/b.bin", &dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello storage");

        assert_eq!(store.head("ck-1/a.bin").unwrap().unwrap().size, 13);
        store.delete("ck-1/sub/b.bin").unwrap();
        store.delete("ck-1/sub/b.bin").unwrap();
        assert!(store.head("ck-1/sub/b.bin").unwrap().is_none());
        assert!(
            !dir.path().join("store/ck-1/sub").exists(),
            "empty dir left behind"
        );
    }

    #[test]
    fn missing_objects_and_bad_keys_are_reported() {
        let (dir, store) = store();
        let err = store.get_file("nope", &dir.path().join("x")).unwrap_err();
        assert!(matches!(err, StorageError::NotFound(_)), "{err}");
        assert!(!dir.path().join("x").exists());
        assert!(store.put_file("../escape", &dir.path().join("x")).is_err());
    }

    #[test]
    fn partial_files_are_invisible_to_listings() {
        let (dir, store) = store();
        std::fs::write(
            dir.path().join("store").join(format!("{PARTIAL_PREFIX}x")),
            b"..",
        )
        .unwrap();
        assert!(store.list("").unwrap().is_empty());
    }
}
