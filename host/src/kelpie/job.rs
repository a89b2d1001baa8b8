//! Training flags → a Kelpie job JSON. The flags go through the real parser, so a job that
//! ferrotune would refuse is refused here, before it is queued, and the synced directories are the
//! ones the trainer will really use (`--output_dir`, `--save_path`, defaults included).

use std::path::Path;

use serde_json::{json, Value};

use super::args::JobArgs;
use crate::cli::{CliStop, Invocation, UsageError};

/// The job JSON for `args` (fields as in the Kelpie API's job schema, see `super`).
pub fn build(args: &JobArgs) -> Result<Value, UsageError> {
    let argv = std::iter::once("ferrotune".to_string())
        .chain(args.training.iter().cloned())
        .collect();
    let job = match crate::cli::parse(argv) {
        Ok(Invocation::Train(job)) => job,
        Ok(Invocation::Command(_)) | Err(CliStop::Display(_)) => {
            return Err(UsageError::new(
                "the arguments after `--` must be training flags (as for `ferrotune ARGS`), \
                 not a subcommand, --help or --version",
            ));
        }
        Err(CliStop::Usage(err)) => {
            return Err(UsageError::new(format!("training args after `--`: {err}")));
        }
    };
    let checkpoints = sync_dir("--output_dir", &job.saving.output_dir)?;
    let outputs = sync_dir("--save_path", &job.saving.save_path)?;
    if checkpoints == outputs {
        return Err(UsageError::new(format!(
            "--output_dir and --save_path are both {checkpoints}: Kelpie would upload the \
             checkpoints as outputs; give them different directories"
        )));
    }
    let prefix = match &args.prefix {
        Some(prefix) => normalise_prefix(prefix)?,
        None => fresh_prefix(),
    };
    let entry = |dir: &str, local_path: &str, direction: &str| {
        json!({
            "bucket": args.bucket,
            "prefix": format!("{prefix}{dir}/"),
            "local_path": local_path,
            "direction": direction,
        })
    };
    Ok(json!({
        "command": "ferrotune",
        "arguments": args.training,
        "environment": {},
        "sync": {
            // Resume: what earlier attempts uploaded comes back before ferrotune starts.
            "before": [entry("checkpoints", &checkpoints, "download")],
            // Every completed checkpoint is uploaded while training runs.
            "during": [entry("checkpoints", &checkpoints, "upload")],
            // Kelpie runs `after` only on exit 0, which ferrotune gives only once the final
            // artefacts are complete.
            "after": [entry("outputs", &outputs, "upload")],
        },
        "max_failures": args.max_failures,
        "heartbeat_interval": args.heartbeat_interval,
        "container_group_id": args.container_group_id,
    }))
}

/// A directory as Kelpie's sync wants it: absolute (the worker resolves it, not ferrotune, and
/// its working directory is not ferrotune's concern), with a trailing slash.
fn sync_dir(flag: &str, dir: &Path) -> Result<String, UsageError> {
    let text = dir
        .to_str()
        .ok_or_else(|| UsageError::new(format!("{flag} {}: not UTF-8", dir.display())))?;
    if !dir.is_absolute() {
        return Err(UsageError::new(format!(
            "{flag} {text}: a Kelpie job needs an absolute path (the Kelpie worker syncs it, from \
             its own working directory); e.g. {flag} /opt/{}",
            text.trim_start_matches("./")
        )));
    }
    Ok(format!("{}/", text.trim_end_matches('/')))
}

/// `a/b` or `/a/b/` → `a/b/`; refuses an empty prefix (the whole bucket) and `..` segments.
fn normalise_prefix(prefix: &str) -> Result<String, UsageError> {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty()
        || trimmed
            .split('/')
            .any(|part| part.is_empty() || part == "..")
    {
        return Err(UsageError::new(format!(
            "--prefix {prefix:?}: give the job its own folder, e.g. --prefix jobs/my-run \
             (not empty, no `..` or `//`)"
        )));
    }
    Ok(format!("{trimmed}/"))
}

/// A prefix no other job has: the time makes it sortable, the random part makes two jobs created
/// in the same second (a sweep script) distinct.
fn fresh_prefix() -> String {
    format!(
        "ferrotune/jobs/{}-{:016x}/",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
        rand::random::<u64>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_normalised_and_bad_ones_refused() {
        assert_eq!(normalise_prefix("/jobs/run-1/").unwrap(), "jobs/run-1/");
        for bad in ["", "/", "a//b", "a/../b"] {
            assert!(normalise_prefix(bad).is_err(), "{bad:?}");
        }
        assert_ne!(fresh_prefix(), fresh_prefix());
    }
}
