//! `--push_model` / `--push_gguf`: after the saves, the written files go to the Hub repository
//! `--hub_path` through the built-in publish plugin (`crate::plugin::publish_host`), in one
//! commit. The model save and the GGUF files land in the same repository, as the Python worker
//! does. A failed push keeps every saved file and says how to retry without retraining.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::cli::args::PushArgs;
use crate::cli::choices::SaveMethod;
use crate::cli::UsageError;
use crate::job::JobConfig;
use crate::plugin::publish_host::{self, ArtefactKind, PushArtefact, PushRequest};
use crate::plugin::PluginLimits;

impl PushArgs {
    pub fn any(&self) -> bool {
        self.push_model || self.push_gguf
    }

    /// Checks the flags before any work starts; returns the token (`--hub_token`, else
    /// `HF_TOKEN`). `saves_model`/`saves_gguf`: whether the job writes what is to be pushed.
    pub fn check(&self, saves_model: bool, saves_gguf: bool) -> Result<String, UsageError> {
        if self.push_model && !saves_model {
            return Err(UsageError::new(
                "--push_model pushes the saved model, but this job saves none; add --save_model \
                 (training) or --save_method (export)",
            ));
        }
        if self.push_gguf && !saves_gguf {
            return Err(UsageError::new(
                "--push_gguf pushes the GGUF files, but this job writes none; add --save_gguf",
            ));
        }
        crate::plugin::publish_host::check_repo_id(&self.hub_path)
            .map_err(|e| UsageError::new(format!("--hub_path {e}")))?;
        self.hub_token
            .clone()
            .or_else(|| std::env::var("HF_TOKEN").ok())
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| {
                UsageError::new(
                    "--push_model/--push_gguf need a Hub token with write access: pass \
                     --hub_token or set HF_TOKEN",
                )
            })
    }
}

/// Before training: `None` when the job pushes nothing, else the token (flags checked).
pub fn check_job(job: &JobConfig) -> Result<Option<String>, UsageError> {
    let flags = &job.saving.push;
    if !flags.any() {
        return Ok(None);
    }
    flags
        .check(job.saving.save_model, job.saving.save_gguf)
        .map(Some)
}

/// The kind of artefact a job's model save is.
pub fn model_kind(save_method: SaveMethod) -> ArtefactKind {
    if save_method == SaveMethod::Lora {
        ArtefactKind::Adapter
    } else {
        ArtefactKind::MergedModel
    }
}

/// After training: pushes what the final exports wrote (`saved`).
pub fn push_job(job: &JobConfig, token: String, saved: &[PathBuf]) -> Result<()> {
    let flags = &job.saving.push;
    let mut retry = export_again(job);
    for (on, flag) in [
        (flags.push_model, "--push_model"),
        (flags.push_gguf, "--push_gguf"),
    ] {
        if on {
            retry.push(' ');
            retry.push_str(flag);
        }
    }
    retry.push_str(&format!(
        " --hub_path {} (token: --hub_token or HF_TOKEN)",
        flags.hub_path
    ));
    push(
        flags,
        token,
        PluginLimits::from_job(job),
        &job.saving.save_path,
        saved,
        model_kind(job.saving.save_method),
        &retry,
    )
}

/// The `ferrotune export` command that writes a training job's final saves again from its
/// adapter or newest checkpoint (a failed push or publish adds its own flags and retries).
pub fn export_again(job: &JobConfig) -> String {
    let s = &job.saving;
    let source = if s.save_model && s.save_method == SaveMethod::Lora {
        format!("--adapter {}", s.save_path.display())
    } else {
        format!(
            "--checkpoint {}/checkpoint-N (the newest)",
            s.output_dir.display()
        )
    };
    let mut retry = format!(
        "ferrotune export {source} --base {} --save_path {}",
        job.model.model_name,
        s.save_path.display()
    );
    if s.save_model {
        retry.push_str(&format!(" --save_method {}", s.save_method));
    }
    if s.save_gguf {
        retry.push_str(&format!(
            " --save_gguf --quantization {}",
            s.quantization.join(" ")
        ));
    }
    retry
}

fn is_gguf_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "gguf")
        || path.file_name().is_some_and(|n| n == "Modelfile")
}

/// The artefacts out of the files an export wrote into `save_path`: the model save (when
/// `with_model`) and the GGUF files with their Modelfile (when `with_gguf`).
pub fn artefacts(
    (with_model, with_gguf): (bool, bool),
    save_path: &Path,
    written: &[PathBuf],
    model_kind: ArtefactKind,
) -> Vec<PushArtefact> {
    let (gguf, model): (Vec<PathBuf>, Vec<PathBuf>) =
        written.iter().cloned().partition(|p| is_gguf_file(p));
    let mut out = Vec::new();
    if with_model && !model.is_empty() {
        out.push(publish_host::artefact_of(model_kind, save_path, &model));
    }
    if with_gguf && !gguf.is_empty() {
        out.push(publish_host::artefact_of(
            ArtefactKind::Gguf,
            save_path,
            &gguf,
        ));
    }
    out
}

/// Pushes `written` (files under `save_path`) as the flags ask. On failure the error is one
/// line ending with `retry` (the command that pushes again without retraining).
pub fn push(
    flags: &PushArgs,
    token: String,
    limits: PluginLimits,
    save_path: &Path,
    written: &[PathBuf],
    model_kind: ArtefactKind,
    retry: &str,
) -> Result<()> {
    let artefacts = artefacts(
        (flags.push_model, flags.push_gguf),
        save_path,
        written,
        model_kind,
    );
    if artefacts.is_empty() {
        anyhow::bail!(
            "--push_model/--push_gguf: nothing was written into {} to push",
            save_path.display()
        );
    }
    let files: usize = artefacts.iter().map(|a| a.files.len()).sum();
    let request = PushRequest {
        endpoint: publish_host::endpoint_from_env(),
        token,
        repo_id: flags.hub_path.clone(),
        message: format!("Upload {files} file(s) with ferrotune"),
        artefacts,
    };
    match publish_host::push(limits, &request) {
        Ok(urls) => {
            for url in urls {
                eprintln!("pushed {files} file(s) to {} ({url})", flags.hub_path);
            }
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!(
            "pushing to the Hub repository {} ({}) failed: {e:#}. Nothing saved was deleted \
             ({}); retry the push without retraining: {retry}",
            flags.hub_path,
            request.endpoint,
            save_path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(model: bool, gguf: bool) -> PushArgs {
        PushArgs {
            push_model: model,
            push_gguf: gguf,
            hub_path: "me/tiny".into(),
            hub_token: Some("t".into()),
            publish: None,
            publish_config: None,
        }
    }

    #[test]
    fn model_and_gguf_files_are_split() {
        let dir = Path::new("/out");
        let written = [
            dir.join("model.safetensors"),
            dir.join("config.json"),
            dir.join("m.Q8_0.gguf"),
            dir.join("Modelfile"),
        ];
        let a = artefacts((true, false), dir, &written, ArtefactKind::MergedModel);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].files, ["model.safetensors", "config.json"]);
        let a = artefacts((false, true), dir, &written, ArtefactKind::MergedModel);
        assert_eq!(a[0].kind, ArtefactKind::Gguf);
        assert_eq!(a[0].files, ["m.Q8_0.gguf", "Modelfile"]);
        assert_eq!(
            artefacts((true, true), dir, &written, ArtefactKind::Adapter).len(),
            2
        );
    }

    #[test]
    fn flags_are_checked_before_work() {
        assert!(flags(true, false).check(false, false).is_err());
        assert!(flags(false, true).check(true, false).is_err());
        assert_eq!(flags(true, true).check(true, true).unwrap(), "t");
        let mut bad = flags(true, false);
        bad.hub_path = "a/b/c".into();
        assert!(bad.check(true, false).unwrap_err().0.contains("--hub_path"));
    }
}
