//! Command line → a validated job. `args` declares the flags, `config_file` merges `--config`,
//! `errors` turns clap's errors into one line, `crate::job` gives the parsed flags their meaning.

pub mod args;
pub mod choices;
mod config_file;
mod errors;

use clap::{CommandFactory, FromArgMatches};

pub use args::{Cli, Command, TrainArgs};
pub use errors::UsageError;

/// What the user asked for, fully validated.
#[derive(Debug)]
pub enum Invocation {
    Train(Box<crate::job::JobConfig>),
    Command(Command),
}

/// Why parsing stopped without an invocation.
#[derive(Debug)]
pub enum CliStop {
    /// `--help` or `--version`: print it and exit 0.
    Display(clap::Error),
    /// Bad input: one line, exit 2.
    Usage(UsageError),
}

impl From<UsageError> for CliStop {
    fn from(e: UsageError) -> Self {
        CliStop::Usage(e)
    }
}

/// Parses `argv` (program name first), merging `--config` and validating every flag.
pub fn parse(argv: Vec<String>) -> Result<Invocation, CliStop> {
    let mut command = Cli::command();
    let argv = config_file::expand(&command, argv)?;
    let matches = command.try_get_matches_from_mut(argv).map_err(clap_stop)?;
    let cli = Cli::from_arg_matches(&matches).map_err(clap_stop)?;
    match cli.command {
        Some(sub) => Ok(Invocation::Command(sub)),
        None => {
            let explicit =
                |id: &str| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
            let job = crate::job::resolve(cli.train, explicit)?;
            Ok(Invocation::Train(Box::new(job)))
        }
    }
}

fn clap_stop(err: clap::Error) -> CliStop {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => CliStop::Display(err),
        _ => CliStop::Usage(UsageError::new(errors::one_line(&err))),
    }
}
