//! `manifest.json`: the size and SHA-256 of every other file of a checkpoint, written last. A
//! checkpoint is valid exactly when its manifest exists and every file it lists matches it, so a
//! directory half-written by a killed process, or damaged later, is never resumed from.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const MANIFEST: &str = "manifest.json";
const FORMAT: &str = "ferrotune-checkpoint";
const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub global_step: u64,
    pub files: BTreeMap<String, FileEntry>,
}

impl Manifest {
    /// Describes every regular file in `dir` (not the manifest itself).
    pub fn describe(dir: &Path, global_step: u64) -> Result<Self> {
        let mut files = BTreeMap::new();
        for entry in
            std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?
        {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == MANIFEST || !entry.file_type()?.is_file() {
                continue;
            }
            files.insert(name, hash_file(&entry.path())?);
        }
        Ok(Self {
            format: FORMAT.into(),
            version: VERSION,
            global_step,
            files,
        })
    }

    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("no {MANIFEST} (the checkpoint was not completed)")
            }
            Err(e) => bail!("cannot read {MANIFEST}: {e}"),
        };
        Self::parse(&bytes)
    }

    /// Parses a manifest (read from disk or downloaded): the format must be ours and every file
    /// name a plain relative path inside the checkpoint, so verifying never reads outside it.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let manifest: Manifest =
            serde_json::from_slice(bytes).with_context(|| format!("{MANIFEST} is not valid"))?;
        if manifest.format != FORMAT || manifest.version != VERSION {
            bail!(
                "{MANIFEST} has format {:?} version {}, expected {FORMAT:?} version {VERSION}",
                manifest.format,
                manifest.version
            );
        }
        for name in manifest.files.keys() {
            let inside = Path::new(name)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            if !inside || name.is_empty() || name == MANIFEST {
                bail!("{MANIFEST} lists {name:?}, which is not a file inside the checkpoint");
            }
        }
        Ok(manifest)
    }

    /// Checks that every listed file, and each of `required`, is present and unchanged.
    pub fn verify(&self, dir: &Path, required: &[&str]) -> Result<()> {
        for name in required {
            if !self.files.contains_key(*name) {
                bail!("{MANIFEST} does not list {name}");
            }
        }
        for (name, want) in &self.files {
            let path = dir.join(name);
            let meta =
                std::fs::metadata(&path).map_err(|_| anyhow::anyhow!("{name} is missing"))?;
            if meta.len() != want.size {
                bail!(
                    "{name} has {} bytes, the manifest says {}",
                    meta.len(),
                    want.size
                );
            }
            let got = hash_file(&path)?;
            if got.sha256 != want.sha256 {
                bail!("{name} does not match its SHA-256 in the manifest (corrupted)");
            }
        }
        Ok(())
    }
}

/// Size and SHA-256 of one file.
pub fn hash_file(path: &Path) -> Result<FileEntry> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok(FileEntry {
        size,
        sha256: hex(&hasher.finalize()),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_intact_files_and_names_each_kind_of_damage() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.json"), b"{}").unwrap();
        std::fs::write(dir.path().join("b.bin"), b"12345").unwrap();
        let m = Manifest::describe(dir.path(), 7).unwrap();
        assert_eq!(m.files.len(), 2);
        assert_eq!(m.files["b.bin"].size, 5);
        // sha256("12345")
        assert_eq!(
            m.files["b.bin"].sha256,
            "5994471abb01112afcc18159f6cc74b4f511b99806da59b3caf5a9c173cacfc5"
        );
        std::fs::write(dir.path().join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
        let read = Manifest::read(dir.path()).unwrap();
        read.verify(dir.path(), &["a.json"]).unwrap();
        assert!(read
            .verify(dir.path(), &["c.json"])
            .unwrap_err()
            .to_string()
            .contains("c.json"));

        std::fs::write(dir.path().join("b.bin"), b"12346").unwrap();
        let err = read.verify(dir.path(), &[]).unwrap_err().to_string();
        assert!(err.contains("b.bin") && err.contains("SHA-256"), "{err}");
        std::fs::write(dir.path().join("b.bin"), b"1234").unwrap();
        let err = read.verify(dir.path(), &[]).unwrap_err().to_string();
        assert!(err.contains("4 bytes"), "{err}");
        std::fs::remove_file(dir.path().join("a.json")).unwrap();
        let err = read.verify(dir.path(), &[]).unwrap_err().to_string();
        assert!(err.contains("a.json is missing"), "{err}");
        std::fs::remove_file(dir.path().join(MANIFEST)).unwrap();
        let err = Manifest::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not completed"), "{err}");
    }

    #[test]
    fn names_outside_the_checkpoint_are_refused() {
        for bad in ["../x", "/etc/passwd", "a/../../b", "", MANIFEST] {
            let m = serde_json::json!({
                "format": FORMAT, "version": VERSION, "global_step": 1,
                "files": { bad: { "size": 1, "sha256": "00" } }
            });
            let err = Manifest::parse(m.to_string().as_bytes()).unwrap_err();
            assert!(
                err.to_string().contains("not a file inside"),
                "{bad}: {err}"
            );
        }
        let nested = serde_json::json!({
            "format": FORMAT, "version": VERSION, "global_step": 1,
            "files": { "sub/b.json": { "size": 1, "sha256": "00" } }
        });
        assert!(Manifest::parse(nested.to_string().as_bytes()).is_ok());
    }
}
