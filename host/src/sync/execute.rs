//! Carries out a policy's actions against an [`ObjectStore`].

use std::collections::BTreeMap;
use std::path::Path;

use super::manifest::{self, MANIFEST};
use super::policy::Action;
use crate::storage::{key, ObjectInfo, ObjectStore, StorageError};

/// What executing one action did (for logs and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    Uploaded { key: String, size: u64 },
    Deleted { key: String },
    DeletedCheckpoint { step: u64 },
    Rotated { deleted_checkpoints: Vec<u64> },
    Downloaded { step: u64 },
    NothingNewer,
}

pub fn execute(store: &dyn ObjectStore, action: &Action) -> Result<Done, StorageError> {
    match action {
        Action::Upload { local, key } => {
            let info = store.put_file(key, local)?;
            Ok(Done::Uploaded {
                key: key.clone(),
                size: info.size,
            })
        }
        Action::Delete { key } => {
            store.delete(key)?;
            Ok(Done::Deleted { key: key.clone() })
        }
        Action::DeleteCheckpoint { prefix, step } => {
            let remote = remote_checkpoints(store, prefix)?;
            if let Some(objects) = remote.get(step) {
                delete_checkpoint(store, objects)?;
            }
            Ok(Done::DeletedCheckpoint { step: *step })
        }
        Action::KeepLast { prefix, count } => keep_last(store, prefix, *count),
        Action::DownloadLatestValid { prefix, into } => download_latest_valid(store, prefix, into),
    }
}

/// Remote checkpoints under `prefix`: step → objects (keys relative to the store).
fn remote_checkpoints(
    store: &dyn ObjectStore,
    prefix: &str,
) -> Result<BTreeMap<u64, Vec<ObjectInfo>>, StorageError> {
    let dir_prefix = if prefix.is_empty() {
        String::new()
    } else {
        format!("{}/", prefix.trim_end_matches('/'))
    };
    let mut found: BTreeMap<u64, Vec<ObjectInfo>> = BTreeMap::new();
    for object in store.list(&dir_prefix)? {
        let rest = &object.key[dir_prefix.len()..];
        let Some((dir, _)) = rest.split_once('/') else {
            continue;
        };
        if let Some(step) = manifest::checkpoint_step(dir) {
            found.entry(step).or_default().push(object);
        }
    }
    Ok(found)
}

fn has_manifest(objects: &[ObjectInfo]) -> bool {
    objects
        .iter()
        .any(|o| o.key.ends_with(&format!("/{MANIFEST}")))
}

/// Deletes checkpoints older than the newest `count` with a manifest. Newer directories without
/// one are uploads in progress and are left alone.
fn keep_last(store: &dyn ObjectStore, prefix: &str, count: usize) -> Result<Done, StorageError> {
    let remote = remote_checkpoints(store, prefix)?;
    let valid: Vec<u64> = remote
        .iter()
        .rev()
        .filter(|(_, objects)| has_manifest(objects))
        .map(|(step, _)| *step)
        .collect();
    let Some(&oldest_kept) = valid.get(count.saturating_sub(1)).filter(|_| count > 0) else {
        return Ok(Done::Rotated {
            deleted_checkpoints: Vec::new(),
        });
    };
    let mut deleted = Vec::new();
    for (step, objects) in remote.range(..oldest_kept) {
        delete_checkpoint(store, objects)?;
        deleted.push(*step);
    }
    Ok(Done::Rotated {
        deleted_checkpoints: deleted,
    })
}

/// Deletes one remote checkpoint's objects, the manifest first: a half-deleted checkpoint must
/// never look valid.
fn delete_checkpoint(store: &dyn ObjectStore, objects: &[ObjectInfo]) -> Result<(), StorageError> {
    let mut objects = objects.to_vec();
    objects.sort_by_key(|o| !o.key.ends_with(&format!("/{MANIFEST}")));
    for object in objects {
        store.delete(&object.key)?;
    }
    Ok(())
}

fn download_latest_valid(
    store: &dyn ObjectStore,
    prefix: &str,
    into: &Path,
) -> Result<Done, StorageError> {
    let local_best = manifest::newest_valid_local(into).map(|(step, _)| step);
    let remote = remote_checkpoints(store, prefix)?;
    for (step, objects) in remote.iter().rev() {
        if local_best.is_some_and(|local| local >= *step) {
            break;
        }
        match download_checkpoint(store, prefix, *step, objects, into) {
            Ok(()) => return Ok(Done::Downloaded { step: *step }),
            Err(Skip::Invalid(why)) => {
                tracing::warn!(
                    step,
                    "remote checkpoint is incomplete or corrupt, trying an older one: {why}"
                )
            }
            Err(Skip::Storage(err)) => return Err(err),
        }
    }
    Ok(Done::NothingNewer)
}

enum Skip {
    Invalid(String),
    Storage(StorageError),
}

impl From<StorageError> for Skip {
    fn from(err: StorageError) -> Self {
        match err {
            StorageError::Integrity(why) | StorageError::NotFound(why) => Skip::Invalid(why),
            other => Skip::Storage(other),
        }
    }
}

/// Downloads one checkpoint into a hidden staging directory, verifies it against its manifest
/// and renames it to `into/checkpoint-<step>` (so the trainer only ever sees it complete).
fn download_checkpoint(
    store: &dyn ObjectStore,
    prefix: &str,
    step: u64,
    objects: &[ObjectInfo],
    into: &Path,
) -> Result<(), Skip> {
    let name = format!("checkpoint-{step}");
    let base = key::join(&[prefix, &name]);
    if !has_manifest(objects) {
        return Err(Skip::Invalid(format!(
            "{base}: no {MANIFEST} (upload never finished)"
        )));
    }
    let staging = into.join(format!(".{name}.download"));
    let _ = std::fs::remove_dir_all(&staging);
    let result = (|| {
        let manifest_key = key::join(&[&base, MANIFEST]);
        store.get_file(&manifest_key, &staging.join(MANIFEST))?;
        let bytes = std::fs::read(staging.join(MANIFEST))
            .map_err(|e| StorageError::local("cannot read", &staging, e))?;
        let manifest = manifest::parse(&bytes, &manifest_key).map_err(Skip::Invalid)?;
        for (name, file) in &manifest.files {
            let file_key = key::join(&[&base, name]);
            let listed = objects.iter().find(|o| o.key == file_key);
            if listed.is_none_or(|o| o.size != file.size) {
                return Err(Skip::Invalid(format!(
                    "{file_key}: missing or not {} bytes as the manifest says",
                    file.size
                )));
            }
            store.get_file(&file_key, &staging.join(name))?;
        }
        manifest::verify_dir(&staging).map_err(Skip::Invalid)?;
        let dest = into.join(&name);
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::rename(&staging, &dest)
            .map_err(|e| StorageError::local("cannot rename", &dest, e))?;
        crate::storage::sync_dir(into);
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::file::FileStore;
    use crate::sync::manifest::write_test_checkpoint;

    fn upload_dir(store: &dyn ObjectStore, dir: &Path, prefix: &str, with_manifest: bool) {
        let name = dir.file_name().unwrap().to_str().unwrap();
        for file in manifest::files_under(dir).unwrap() {
            if file == MANIFEST && !with_manifest {
                continue;
            }
            store
                .put_file(&key::join(&[prefix, name, &file]), &dir.join(&file))
                .unwrap();
        }
    }

    #[test]
    fn downloads_the_newest_checkpoint_that_verifies() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::new(tmp.path().join("remote")).unwrap();
        let src = tmp.path().join("src");
        // 2: good. 3: corrupt after upload. 4: manifest never arrived.
        let good = write_test_checkpoint(&src, 2, &[("w.bin", b"two"), ("s/t.json", b"{}")]);
        upload_dir(&store, &good, "ck", true);
        let corrupt = write_test_checkpoint(&src, 3, &[("w.bin", b"three")]);
        upload_dir(&store, &corrupt, "ck", true);
        std::fs::write(tmp.path().join("remote/ck/checkpoint-3/w.bin"), b"thrEe").unwrap();
        let partial = write_test_checkpoint(&src, 4, &[("w.bin", b"four")]);
        upload_dir(&store, &partial, "ck", false);

        let out = tmp.path().join("out");
        let action = Action::DownloadLatestValid {
            prefix: "ck".into(),
            into: out.clone(),
        };
        assert_eq!(
            execute(&store, &action).unwrap(),
            Done::Downloaded { step: 2 }
        );
        assert_eq!(
            std::fs::read(out.join("checkpoint-2/s/t.json")).unwrap(),
            b"{}"
        );
        let names: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["checkpoint-2"], "no staging directories left");
        // A second resume finds nothing newer than what is local.
        assert_eq!(execute(&store, &action).unwrap(), Done::NothingNewer);
    }

    #[test]
    fn keep_last_deletes_old_checkpoints_manifest_first_and_spares_uploads_in_progress() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::new(tmp.path().join("remote")).unwrap();
        let src = tmp.path().join("src");
        for step in [1, 2, 3] {
            let dir = write_test_checkpoint(&src, step, &[("w", b"x")]);
            upload_dir(&store, &dir, "ck", true);
        }
        let in_progress = write_test_checkpoint(&src, 4, &[("w", b"x")]);
        upload_dir(&store, &in_progress, "ck", false);
        let done = execute(
            &store,
            &Action::KeepLast {
                prefix: "ck".into(),
                count: 2,
            },
        )
        .unwrap();
        assert_eq!(
            done,
            Done::Rotated {
                deleted_checkpoints: vec![1]
            }
        );
        let keys: Vec<_> = store.list("").unwrap().into_iter().map(|o| o.key).collect();
        assert_eq!(
            keys,
            [
                "ck/checkpoint-2/manifest.json",
                "ck/checkpoint-2/w",
                "ck/checkpoint-3/manifest.json",
                "ck/checkpoint-3/w",
                "ck/checkpoint-4/w"
            ]
        );
        let delete = |step| Action::DeleteCheckpoint {
            prefix: "ck".into(),
            step,
        };
        assert_eq!(
            execute(&store, &delete(2)).unwrap(),
            Done::DeletedCheckpoint { step: 2 }
        );
        // A checkpoint that is not there is already deleted.
        execute(&store, &delete(99)).unwrap();
        let keys: Vec<_> = store.list("").unwrap().into_iter().map(|o| o.key).collect();
        assert_eq!(
            keys,
            [
                "ck/checkpoint-3/manifest.json",
                "ck/checkpoint-3/w",
                "ck/checkpoint-4/w"
            ]
        );
    }
}
