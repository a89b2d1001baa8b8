//! Flags of `ferrotune kelpie …` (parsing only; `job` and `api` give them meaning).

use std::path::PathBuf;

use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
#[command(rename_all = "snake_case")]
pub enum KelpieCommand {
    /// Print a Kelpie job JSON that runs `ferrotune TRAINING ARGS` with checkpoints and outputs
    /// synced to BUCKET under a per-job prefix.
    Job(JobArgs),
    /// POST a job JSON file to the Kelpie API; prints the created job (with its id).
    Submit {
        /// The job JSON, e.g. written by `ferrotune kelpie job … > job.json`.
        job: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print a job's state as the Kelpie API reports it.
    Status {
        /// The job id `submit` printed.
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Cancel a job (Kelpie sends SIGINT to a running ferrotune, which stops at the next safe point).
    Cancel {
        /// The job id `submit` printed.
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Debug, Args, Clone)]
#[command(rename_all = "snake_case")]
pub struct JobArgs {
    /// The SaladCloud container group whose nodes run the job.
    #[arg(long)]
    pub container_group_id: String,
    /// Bucket (S3-compatible) for the job's checkpoints and outputs.
    #[arg(long)]
    pub bucket: String,
    /// The job's own prefix in the bucket [default: ferrotune/jobs/<UTC time>-<random id>]. Never
    /// share one between concurrent jobs (see docs/kelpie.md).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Failed attempts (non-zero exits) before Kelpie gives the job up.
    #[arg(long, default_value_t = 3)]
    pub max_failures: u32,
    /// Seconds between the Kelpie worker's heartbeats.
    #[arg(long, default_value_t = 30)]
    pub heartbeat_interval: u32,
    /// The training flags, after `--`, exactly as `ferrotune` takes them.
    #[arg(last = true, required = true, value_name = "TRAINING ARGS")]
    pub training: Vec<String>,
}

/// Who is asking: the API key only ever comes from SALAD_API_KEY (a flag would land in shell
/// history and `ps`); organization and project may come from flags or the environment.
#[derive(Debug, Args, Clone)]
#[command(rename_all = "snake_case")]
pub struct ApiArgs {
    /// SaladCloud organization [env: SALAD_ORGANIZATION].
    #[arg(long)]
    pub organization: Option<String>,
    /// SaladCloud project [env: SALAD_PROJECT].
    #[arg(long)]
    pub project: Option<String>,
}
