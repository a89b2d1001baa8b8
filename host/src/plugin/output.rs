//! A plugin's stdout and stderr: each complete line goes to the host log tagged with the
//! plugin's name, and the last few stderr lines are kept so that a trap report can quote the
//! panic message the guest printed just before it died.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use super::storage_config::Secrets;

/// Lines of stderr kept for error reports.
const TAIL_LINES: usize = 8;
/// A line longer than this is logged in pieces (a plugin cannot make the host buffer unbounded).
const MAX_LINE: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// One of a plugin's output streams. Cheap to clone; clones share the line buffer.
#[derive(Clone)]
pub struct PluginOutput {
    plugin: Arc<str>,
    stream: Stream,
    state: Arc<Mutex<LineState>>,
    /// Secret values masked in every line (a storage plugin's credentials).
    secrets: Secrets,
}

#[derive(Default)]
struct LineState {
    partial: Vec<u8>,
    tail: VecDeque<String>,
}

impl PluginOutput {
    pub fn new(plugin: Arc<str>, stream: Stream) -> Self {
        PluginOutput {
            plugin,
            stream,
            state: Arc::default(),
            secrets: Secrets::default(),
        }
    }

    /// Masks `secrets` in every line this stream logs or keeps.
    pub fn masking(mut self, secrets: Secrets) -> Self {
        self.secrets = secrets;
        self
    }

    fn write_bytes(&self, bytes: &[u8]) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.partial.extend_from_slice(bytes);
        while let Some(end) = state.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = state.partial.drain(..=end).collect();
            self.emit(&mut state, &line[..line.len() - 1]);
        }
        if state.partial.len() > MAX_LINE {
            let line = std::mem::take(&mut state.partial);
            self.emit(&mut state, &line);
        }
    }

    fn emit(&self, state: &mut LineState, line: &[u8]) {
        let line = self
            .secrets
            .mask(String::from_utf8_lossy(line).trim_end_matches('\r'));
        match self.stream {
            Stream::Stdout => tracing::info!(plugin = %self.plugin, "{line}"),
            Stream::Stderr => {
                tracing::warn!(plugin = %self.plugin, "{line}");
                if state.tail.len() == TAIL_LINES {
                    state.tail.pop_front();
                }
                state.tail.push_back(line);
            }
        }
    }

    /// The last stderr lines (including an unterminated one), oldest first, and forgets them.
    pub fn take_tail(&self) -> Vec<String> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !state.partial.is_empty() {
            let line = std::mem::take(&mut state.partial);
            self.emit(&mut state, &line);
        }
        state.tail.drain(..).collect()
    }
}

impl IsTerminal for PluginOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for PluginOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for PluginOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.write_bytes(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for PluginOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for PluginOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.write_bytes(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_stderr_lines_including_an_unterminated_one() {
        let out = PluginOutput::new("t".into(), Stream::Stderr);
        out.write_bytes(b"first\nsec");
        out.write_bytes(b"ond\r\nthird");
        assert_eq!(out.take_tail(), ["first", "second", "third"]);
        assert!(out.take_tail().is_empty());
        for i in 0..20 {
            out.write_bytes(format!("{i}\n").as_bytes());
        }
        assert_eq!(out.take_tail().len(), TAIL_LINES);
    }

    #[test]
    fn masks_secrets_in_every_line() {
        let secrets = Secrets::new(vec!["hunter2-pw".into()]);
        let out = PluginOutput::new("t".into(), Stream::Stderr).masking(secrets);
        out.write_bytes(b"login with hunter2-pw failed\nhunter2-");
        out.write_bytes(b"pw again");
        let tail = out.take_tail().join("\n");
        assert!(!tail.contains("hunter2-pw"), "{tail}");
        assert_eq!(tail.matches("<redacted>").count(), 2, "{tail}");
    }
}
