//! `ferrotune kelpie`: the bridge to SaladCloud's Kelpie job queue. `args` declares the
//! subcommands, `job` turns training flags into a Kelpie job JSON, `api` talks to the Kelpie API.
//!
//! Schema and endpoints follow the Kelpie API's README and live swagger docs:
//! <https://github.com/SaladTechnologies/kelpie-api> (<https://kelpie.saladexamples.com/docs>).

pub mod api;
pub mod args;
pub mod job;

use anyhow::Context;

use self::args::KelpieCommand;

/// Runs one `ferrotune kelpie …` subcommand; whatever the server answers is printed as JSON.
pub fn run(command: KelpieCommand) -> anyhow::Result<()> {
    let answer = match command {
        KelpieCommand::Job(args) => Some(job::build(&args)?),
        KelpieCommand::Submit { job, api } => {
            let text = std::fs::read_to_string(&job)
                .with_context(|| format!("cannot read the job file {}", job.display()))?;
            let body: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                crate::cli::UsageError::new(format!(
                    "{}: not JSON ({e}); write it with `ferrotune kelpie job … > {}`",
                    job.display(),
                    job.display()
                ))
            })?;
            api::Api::from_env(&api)?.submit(&body)?
        }
        KelpieCommand::Status { id, api } => api::Api::from_env(&api)?.status(&id)?,
        KelpieCommand::Cancel { id, api } => api::Api::from_env(&api)?.cancel(&id)?,
    };
    if let Some(value) = answer {
        println!("{}", serde_json::to_string_pretty(&value)?);
    }
    Ok(())
}
