//! What sync tells a policy about local files: a checkpoint directory's files (sizes and SHA-256
//! from its manifest, so nothing is hashed twice on the training thread) and the final
//! artefacts under `--save_path`, grouped by kind.

use std::path::Path;

use super::manifest::{self, MANIFEST};
use super::policy::{Artefact, ArtefactKind, LocalFile, SavedCheckpoint};

/// The event payload for a complete `checkpoint-<step>` directory.
pub fn saved_checkpoint(dir: &Path) -> Result<SavedCheckpoint, String> {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let step = manifest::checkpoint_step(name)
        .ok_or_else(|| format!("{} is not a checkpoint-N directory", dir.display()))?;
    let manifest_path = dir.join(MANIFEST);
    let bytes = std::fs::read(&manifest_path)
        .map_err(|e| format!("{}: cannot read ({e})", manifest_path.display()))?;
    let listed = manifest::parse(&bytes, &manifest_path.display().to_string())?;
    let files = sized_files(dir)?
        .into_iter()
        .map(|mut file| {
            file.sha256 = listed.files.get(&file.path).map(|f| f.sha256.clone());
            file
        })
        .collect();
    Ok(SavedCheckpoint {
        step,
        dir: dir.to_path_buf(),
        files,
    })
}

/// The final artefacts in `save_path`: one per GGUF file, and the rest (a PEFT adapter, a merged
/// model, or other files) as one more.
pub fn artefacts_in(save_path: &Path) -> Result<Vec<Artefact>, String> {
    let files = sized_files(save_path)?;
    let (gguf, rest): (Vec<LocalFile>, Vec<LocalFile>) =
        files.into_iter().partition(|f| f.path.ends_with(".gguf"));
    let mut artefacts: Vec<Artefact> = gguf
        .into_iter()
        .map(|file| Artefact {
            kind: ArtefactKind::Gguf,
            dir: save_path.to_path_buf(),
            quantization: gguf_preset(&file.path),
            files: vec![file],
        })
        .collect();
    if !rest.is_empty() {
        let has = |name: &str| rest.iter().any(|f| f.path == name);
        let kind = if has("adapter_config.json") {
            ArtefactKind::Adapter
        } else if has("config.json") {
            ArtefactKind::MergedModel
        } else {
            ArtefactKind::Other
        };
        artefacts.insert(
            0,
            Artefact {
                kind,
                dir: save_path.to_path_buf(),
                files: rest,
                quantization: None,
            },
        );
    }
    Ok(artefacts)
}

/// `Model.Q8_0.gguf` → `q8_0` (the export names GGUF files `<name>.<PRESET>.gguf`).
fn gguf_preset(file: &str) -> Option<String> {
    let stem = file.rsplit('/').next()?.strip_suffix(".gguf")?;
    let (_, preset) = stem.rsplit_once('.')?;
    (!preset.is_empty()).then(|| preset.to_ascii_lowercase())
}

fn sized_files(dir: &Path) -> Result<Vec<LocalFile>, String> {
    let names =
        manifest::files_under(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    names
        .into_iter()
        .map(|path| {
            let meta = std::fs::metadata(dir.join(&path))
                .map_err(|e| format!("{}: {e}", dir.join(&path).display()))?;
            Ok(LocalFile {
                path,
                size: meta.len(),
                sha256: None,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::manifest::write_test_checkpoint;

    #[test]
    fn checkpoint_files_carry_the_manifest_hashes() {
        let out = tempfile::tempdir().unwrap();
        let dir = write_test_checkpoint(out.path(), 12, &[("a.bin", b"abc"), ("s/t.json", b"{}")]);
        let saved = saved_checkpoint(&dir).unwrap();
        assert_eq!(saved.step, 12);
        let paths: Vec<_> = saved.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["a.bin", "manifest.json", "s/t.json"]);
        let a = &saved.files[0];
        assert_eq!(a.size, 3);
        assert_eq!(
            a.sha256.as_deref(),
            Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        assert_eq!(
            saved.files[1].sha256, None,
            "the manifest does not list itself"
        );
        assert!(saved_checkpoint(out.path()).is_err());
    }

    #[test]
    fn artefacts_are_grouped_by_kind() {
        let save = tempfile::tempdir().unwrap();
        for name in [
            "adapter_config.json",
            "adapter_model.safetensors",
            "Tiny.Q8_0.gguf",
            "Tiny.F16.gguf",
        ] {
            std::fs::write(save.path().join(name), b"x").unwrap();
        }
        let artefacts = artefacts_in(save.path()).unwrap();
        let summary: Vec<_> = artefacts
            .iter()
            .map(|a| (a.kind, a.files.len(), a.quantization.clone()))
            .collect();
        assert_eq!(
            summary,
            [
                (ArtefactKind::Adapter, 2, None),
                (ArtefactKind::Gguf, 1, Some("f16".into())),
                (ArtefactKind::Gguf, 1, Some("q8_0".into())),
            ]
        );
    }
}
