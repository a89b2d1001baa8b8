//! Where training metrics go: a log line per logging step (through `tracing`, so `--log_format
//! json` gets fields), an indicatif progress bar when stderr is a terminal, and tensorboard event
//! files under `OUTPUT_DIR/runs/<run>/` with `--report_to tensorboard|all`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};

use super::tensorboard::EventWriter;
use crate::cli::choices::LogFormat;
use crate::job::JobConfig;

/// One logging point's training metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainMetrics {
    pub step: u64,
    pub total_steps: u64,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub epoch: f64,
    pub tokens_per_second: f64,
    pub eta_seconds: f64,
}

pub struct Reporter {
    bar: Option<ProgressBar>,
    events: Option<EventWriter>,
    json: bool,
    /// When this process started training and at which step (for rates and ETA).
    started: Instant,
    start_step: u64,
}

impl Reporter {
    pub fn new(job: &JobConfig, start_step: u64, total_steps: u64) -> Result<Self> {
        let events = match job.reporting.report_to.as_str() {
            "tensorboard" | "all" => {
                let run = format!(
                    "{}_{}",
                    chrono::Local::now().format("%b%d_%H-%M-%S"),
                    super::tensorboard::hostname()
                );
                let dir: PathBuf = job.saving.output_dir.join("runs").join(run);
                let writer = EventWriter::create(&dir)?;
                tracing::info!("tensorboard events: {}", writer.path().display());
                Some(writer)
            }
            _ => None,
        };
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total_steps);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30.cyan/blue} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .expect("valid template"),
            );
            bar.set_position(start_step);
            bar
        });
        Ok(Self {
            bar,
            events,
            json: job.reporting.log_format == LogFormat::Json,
            started: Instant::now(),
            start_step,
        })
    }

    /// Steps per second in this process so far, and the seconds left at that rate.
    pub fn eta(&self, step: u64, total_steps: u64) -> f64 {
        let done = step.saturating_sub(self.start_step);
        if done == 0 {
            return f64::NAN;
        }
        let per_step = self.started.elapsed().as_secs_f64() / done as f64;
        per_step * total_steps.saturating_sub(step) as f64
    }

    pub fn step_done(&self, step: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(step);
        }
    }

    pub fn train(&mut self, m: &TrainMetrics) -> Result<()> {
        let line = format!(
            "step {}/{} | loss {:.4} | lr {:.3e} | grad_norm {:.4} | {:.0} tok/s | epoch {:.2} | eta {}",
            m.step,
            m.total_steps,
            m.loss,
            m.learning_rate,
            m.grad_norm,
            m.tokens_per_second,
            m.epoch,
            format_duration(m.eta_seconds)
        );
        self.emit(|| {
            if self.json {
                tracing::info!(
                    step = m.step,
                    total_steps = m.total_steps,
                    loss = m.loss,
                    learning_rate = m.learning_rate,
                    grad_norm = m.grad_norm,
                    tokens_per_second = m.tokens_per_second,
                    epoch = m.epoch,
                    eta_seconds = m.eta_seconds,
                    "train"
                );
            } else {
                tracing::info!("{line}");
            }
        });
        if let Some(bar) = &self.bar {
            bar.set_message(format!("loss {:.4}", m.loss));
        }
        if let Some(events) = &mut self.events {
            events.scalar("train/loss", m.loss, m.step)?;
            events.scalar("train/learning_rate", m.learning_rate, m.step)?;
            events.scalar("train/grad_norm", m.grad_norm, m.step)?;
            events.scalar("train/epoch", m.epoch, m.step)?;
            events.scalar("train/tokens_per_second", m.tokens_per_second, m.step)?;
            events.flush()?;
        }
        Ok(())
    }

    pub fn eval(&mut self, step: u64, loss: f64, epoch: f64) -> Result<()> {
        self.emit(|| {
            if self.json {
                tracing::info!(step, eval_loss = loss, epoch, "eval");
            } else {
                tracing::info!("step {step} | eval_loss {loss:.4} | epoch {epoch:.2}");
            }
        });
        if let Some(events) = &mut self.events {
            events.scalar("eval/loss", loss, step)?;
            events.flush()?;
        }
        Ok(())
    }

    /// A plain message that must not tear the progress bar.
    pub fn info(&self, message: &str) {
        self.emit(|| tracing::info!("{message}"));
    }

    pub fn finish(&mut self) -> Result<()> {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if let Some(events) = &mut self.events {
            events.flush()?;
        }
        Ok(())
    }

    fn emit(&self, f: impl FnOnce()) {
        match &self.bar {
            Some(bar) => bar.suspend(f),
            None => f(),
        }
    }
}

/// `h:mm:ss`, or `?` before a rate is known.
pub fn format_duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "?".into();
    }
    let s = seconds.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_clock_time() {
        assert_eq!(format_duration(3725.4), "1:02:05");
        assert_eq!(format_duration(f64::NAN), "?");
    }
}
