//! Runs a parsed invocation and maps its outcome to the process exit code:
//! 0 success, 1 a failure while running, 2 bad input (nothing was written).

use std::process::ExitCode;

use crate::cli::choices::LogFormat;
use crate::cli::{CliStop, Command, Invocation, UsageError};
use crate::job::{self, JobConfig};

/// Entry point shared by the binary and the tests.
pub fn main_with_args(argv: Vec<String>) -> ExitCode {
    let invocation = match crate::cli::parse(argv) {
        Ok(invocation) => invocation,
        Err(CliStop::Display(help)) => {
            let _ = help.print();
            return ExitCode::SUCCESS;
        }
        Err(CliStop::Usage(err)) => return usage_exit(&err),
    };
    // Every log line of the run, errors included, is recorded inside the job span so that it
    // carries KELPIE_JOB_ID; the subscriber must exist before the span is created.
    let log_format = match &invocation {
        Invocation::Train(job) => job.reporting.log_format,
        // `ferrotune format` takes the training flags, --log_format included.
        Invocation::Command(Command::Format(args)) => args.job.reporting.log_format,
        Invocation::Command(_) => LogFormat::Text,
    };
    crate::logging::init(log_format);
    let span = crate::logging::job_span();
    let _entered = span.enter();
    let outcome = match invocation {
        Invocation::Train(job) => train(*job),
        Invocation::Command(command) => run_command(command),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => match err.downcast_ref::<UsageError>() {
            Some(usage) => usage_exit(usage),
            None => {
                tracing::error!("{err:#}");
                eprintln!("error: {err:#}");
                ExitCode::from(1)
            }
        },
    }
}

fn usage_exit(err: &UsageError) -> ExitCode {
    eprintln!("error: {err}");
    ExitCode::from(2)
}

fn train(job: JobConfig) -> anyhow::Result<()> {
    if job.run.dry_run {
        println!("{}", serde_json::to_string_pretty(&job)?);
        return Ok(());
    }
    tracing::info!(config = %serde_json::to_string(&job)?, "resolved configuration");
    let missing = job::unbuilt_features(&job);
    if !missing.is_empty() {
        return Err(UsageError::new(format!(
            "this job needs features ferrotune cannot run yet: {}",
            missing.join("; ")
        ))
        .into());
    }
    let push_token = crate::export::push::check_job(&job)?;
    let publish_plan = crate::export::publish::check_job(&job)?;
    let report = crate::train::run_job(&job)?;
    for file in &report.saved {
        println!("{}", file.display());
    }
    if !report.completed {
        return Ok(());
    }
    if let Some(token) = push_token {
        crate::export::push::push_job(&job, token, &report.saved)?;
    }
    if let Some(plan) = &publish_plan {
        crate::export::publish::publish_job(&job, plan, &report.saved)?;
    }
    Ok(())
}

fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo(args) => crate::demo::run(&args),
        Command::Plugin(command) => crate::plugin::command::run(command),
        Command::Format(args) => crate::plugin::command::format(*args),
        Command::Export(args) => crate::export::command::run(*args),
        Command::Bench(args) => crate::bench::run(&args),
        Command::Kelpie(command) => crate::kelpie::run(command),
        Command::Kernels(args) => crate::precompile::run(&args),
    }
}
