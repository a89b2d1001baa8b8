//! Log lines go to stderr, human-readable or JSON lines. When Kelpie runs us, `KELPIE_JOB_ID` is
//! attached to every line through a root span that lives for the whole job.

use tracing_subscriber::{fmt, EnvFilter};

use crate::cli::choices::LogFormat;

/// Installs the global subscriber. `FERROTUNE_LOG` (or `RUST_LOG`) overrides the `info` level.
pub fn init(format: LogFormat) {
    let filter = std::env::var("FERROTUNE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .map(EnvFilter::new)
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (tests run several jobs in one process) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

/// The span every job's log lines are recorded in; carries `kelpie_job_id` when Kelpie set it.
pub fn job_span() -> tracing::Span {
    match std::env::var("KELPIE_JOB_ID") {
        Ok(id) if !id.is_empty() => tracing::info_span!("job", kelpie_job_id = %id),
        _ => tracing::info_span!("job"),
    }
}
