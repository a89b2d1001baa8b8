//! `--publish PATH.wasm`: after the saves (and any Hub push) the written files go to the user's
//! publish plugin (`crate::plugin::publish_host::publish_with_plugin`), configured by
//! `--publish_config`. Everything is checked before any work starts; a failed publish keeps every
//! saved file and says how to publish again without retraining.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::push::{self, export_again, model_kind};
use crate::cli::args::PushArgs;
use crate::cli::UsageError;
use crate::job::{json_or_file, JobConfig};
use crate::plugin::publish_host::{self, ArtefactKind};
use crate::plugin::storage_config::NetPluginConfig;
use crate::plugin::PluginLimits;

const CONFIG_FLAG: &str = "--publish_config";

/// A checked `--publish`: the plugin and its parsed config (secrets resolved).
pub struct PublishPlan {
    path: PathBuf,
    config: NetPluginConfig,
}

/// Checks `--publish`/`--publish_config` before any work: `None` when the job publishes nothing.
/// `saves`: whether the job writes a model or GGUF files to publish.
pub fn check(flags: &PushArgs, saves: bool) -> Result<Option<PublishPlan>> {
    let Some(path) = &flags.publish else {
        if flags.publish_config.is_some() {
            return Err(UsageError::new(
                "--publish_config configures a --publish plugin, but none is given; add \
                 --publish PATH.wasm or remove --publish_config",
            )
            .into());
        }
        return Ok(None);
    };
    if !saves {
        return Err(UsageError::new(
            "--publish sends the saved model or GGUF files, but this job saves none; add \
             --save_model or --save_gguf (training) or --save_method / --save_gguf (export)",
        )
        .into());
    }
    let value = match &flags.publish_config {
        Some(text) => Some(json_or_file(CONFIG_FLAG, text)?),
        None => None,
    };
    let config = NetPluginConfig::parse_flag(CONFIG_FLAG, value.as_ref())
        .map_err(|e| UsageError::new(e.to_string()))?;
    publish_host::check_plugin(path)?;
    Ok(Some(PublishPlan {
        path: path.clone(),
        config,
    }))
}

/// Before training: the job's publish plan, if any.
pub fn check_job(job: &JobConfig) -> Result<Option<PublishPlan>> {
    let s = &job.saving;
    check(&s.push, s.save_model || s.save_gguf)
}

/// After training: publishes what the final exports wrote (`saved`).
pub fn publish_job(job: &JobConfig, plan: &PublishPlan, saved: &[PathBuf]) -> Result<()> {
    let retry = format!(
        "{} --publish {} with the same --publish_config",
        export_again(job),
        plan.path.display()
    );
    publish(
        plan,
        PluginLimits::from_job(job),
        &job.saving.save_path,
        saved,
        model_kind(job.saving.save_method),
        &retry,
    )
}

/// Hands `written` (files under `save_path`) to the plugin. On failure the error is one line
/// ending with `retry` (the command that publishes again without retraining).
pub fn publish(
    plan: &PublishPlan,
    limits: PluginLimits,
    save_path: &Path,
    written: &[PathBuf],
    model_kind: ArtefactKind,
    retry: &str,
) -> Result<()> {
    let artefacts = push::artefacts((true, true), save_path, written, model_kind);
    if artefacts.is_empty() {
        anyhow::bail!(
            "--publish: nothing was written into {} to publish",
            save_path.display()
        );
    }
    let name = crate::plugin::file_label(&plan.path);
    match publish_host::publish_with_plugin(limits, &plan.path, &plan.config, &artefacts) {
        Ok(reports) => {
            for report in reports {
                eprintln!("published with {name}: {report}");
            }
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!(
            "publishing with {name} failed: {e:#}. Nothing saved was deleted ({}); publish again \
             without retraining: {retry}",
            save_path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(publish: Option<&str>, config: Option<&str>) -> PushArgs {
        PushArgs {
            push_model: false,
            push_gguf: false,
            hub_path: "me/tiny".into(),
            hub_token: None,
            publish: publish.map(PathBuf::from),
            publish_config: config.map(String::from),
        }
    }

    fn usage_error(result: Result<Option<PublishPlan>>) -> String {
        let err = result.err().expect("an error");
        err.downcast_ref::<UsageError>()
            .unwrap_or_else(|| panic!("not a usage error: {err:#}"))
            .to_string()
    }

    #[test]
    fn nothing_to_publish_is_fine_and_half_given_flags_are_errors() {
        assert!(check(&flags(None, None), true).unwrap().is_none());
        let orphan = usage_error(check(&flags(None, Some("{}")), true));
        assert!(orphan.contains("add --publish PATH.wasm"), "{orphan}");
        let unsaved = usage_error(check(&flags(Some("p.wasm"), None), false));
        assert!(unsaved.contains("saves none"), "{unsaved}");
    }

    #[test]
    fn bad_configs_and_missing_plugins_name_the_flag() {
        let json = usage_error(check(&flags(Some("p.wasm"), Some("{nope")), true));
        assert!(
            json.contains("--publish_config value: invalid JSON"),
            "{json}"
        );
        let hosts = usage_error(check(
            &flags(Some("p.wasm"), Some(r#"{"allow_hosts": ["example.com"]}"#)),
            true,
        ));
        assert!(hosts.contains("--publish_config.allow_hosts"), "{hosts}");
        let missing = usage_error(check(&flags(Some("/nonexistent/p.wasm"), None), true));
        assert!(
            missing.contains("--publish /nonexistent/p.wasm: cannot read it"),
            "{missing}"
        );
    }
}
