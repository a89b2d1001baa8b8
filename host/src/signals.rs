//! Stop requests from the outside world, as Kelpie sends them.
//!
//! Kelpie cancels a job with SIGINT and expects it to end *by that signal* (an interruption: the
//! job is neither completed nor failed). So a first SIGINT/SIGTERM only raises a flag that the
//! training loop polls at safe points (between optimizer steps, never inside a checkpoint
//! write); the loop stops, removes anything partial, and the process then calls [`die_by`],
//! which restores the default action and re-raises the signal. A second identical signal while
//! stopping kills at once (the default action), so an impatient Ctrl-C still works.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, OnceLock};

pub use signal_hook::consts::{SIGINT, SIGTERM};

/// The signal that asked the job to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// Cancel (Kelpie, Ctrl-C): stop at the next safe point without writing anything new.
    Interrupt,
    /// Termination (node shutdown): a checkpoint may be written if it finishes quickly.
    Terminate,
}

impl StopSignal {
    pub fn number(self) -> i32 {
        match self {
            StopSignal::Interrupt => SIGINT,
            StopSignal::Terminate => SIGTERM,
        }
    }
}

/// A cheap handle the training loop polls. Clones share the same flag.
#[derive(Debug, Clone)]
pub struct StopFlag {
    received: Arc<AtomicI32>,
}

impl StopFlag {
    /// A flag no signal sets (tests, library use without a process to stop).
    pub fn never() -> Self {
        StopFlag {
            received: Arc::new(AtomicI32::new(0)),
        }
    }

    /// Which stop was requested, if any. The first signal wins.
    pub fn requested(&self) -> Option<StopSignal> {
        match self.received.load(Ordering::SeqCst) {
            0 => None,
            s if s == SIGTERM => Some(StopSignal::Terminate),
            _ => Some(StopSignal::Interrupt),
        }
    }

    /// Marks a stop as requested (what the handlers do; also usable by tests).
    pub fn request(&self, signal: StopSignal) {
        let _ =
            self.received
                .compare_exchange(0, signal.number(), Ordering::SeqCst, Ordering::SeqCst);
    }
}

static INSTALLED: OnceLock<StopFlag> = OnceLock::new();

/// Installs the SIGINT/SIGTERM handlers once per process and returns the shared flag.
pub fn install() -> std::io::Result<StopFlag> {
    if let Some(flag) = INSTALLED.get() {
        return Ok(flag.clone());
    }
    let flag = StopFlag::never();
    for signal in [SIGINT, SIGTERM] {
        // Registered first so it sees the state before this delivery: set → default action.
        let seen = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register_conditional_default(signal, Arc::clone(&seen))?;
        signal_hook::flag::register(signal, seen)?;
        // The stop flag records the first signal only (compare-and-swap from 0).
        let received = Arc::clone(&flag.received);
        // SAFETY: the action only does an atomic compare-and-swap, which is async-signal-safe.
        unsafe {
            signal_hook::low_level::register(signal, move || {
                let _ = received.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
            })?;
        }
    }
    Ok(INSTALLED.get_or_init(|| flag).clone())
}

/// Ends the process by `signal` with its default action, so the parent (Kelpie) sees a death by
/// signal rather than an exit code. Call only after everything partial has been cleaned up.
pub fn die_by(signal: StopSignal) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    let number = signal.number();
    let _ = signal_hook::low_level::emulate_default_handler(number);
    // Only reached if the default action did not end the process (it always does for these).
    std::process::exit(128 + number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn first_signal_wins() {
        let flag = StopFlag::never();
        assert_eq!(flag.requested(), None);
        flag.request(StopSignal::Terminate);
        flag.request(StopSignal::Interrupt);
        assert_eq!(flag.requested(), Some(StopSignal::Terminate));
    }

    /// Runs in a child copy of this test binary (see `sigint_sets_the_flag_then_dies_by_sigint`).
    #[test]
    fn child_raises_sigint() {
        if std::env::var_os("FERROTUNE_SIGNAL_CHILD").is_none() {
            return;
        }
        let flag = install().unwrap();
        signal_hook::low_level::raise(SIGINT).unwrap();
        // The handler ran synchronously in this thread during raise: the flag is set and the
        // process is still alive.
        assert_eq!(flag.requested(), Some(StopSignal::Interrupt));
        println!("flag-set");
        die_by(StopSignal::Interrupt);
    }

    #[test]
    fn sigint_sets_the_flag_then_dies_by_sigint() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "signals::tests::child_raises_sigint",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("FERROTUNE_SIGNAL_CHILD", "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("flag-set"), "child output: {stdout}");
        assert_eq!(
            out.status.signal(),
            Some(SIGINT),
            "child status: {:?}",
            out.status
        );
    }
}
