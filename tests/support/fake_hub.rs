//! The fake Hugging Face Hub (`tests/python/fake_hub_upload.py`) as a child process, killed on
//! drop. Shared by `tests/publish.rs` (through the binary) and `plugins/hf-publish/tests/hub.rs`
//! (the protocol natively, which includes this file by path). With CI=true a missing python3
//! fails the test; elsewhere the test is skipped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct FakeHub {
    child: Child,
    pub port: u16,
    /// Where the hub keeps repositories (`repos/OWNER/NAME`), `requests.jsonl` and
    /// `commits.jsonl`.
    pub store: PathBuf,
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl FakeHub {
    /// Starts the hub accepting `token`: files of `lfs_from` bytes or more go through LFS,
    /// LFS objects over `multipart_over` bytes are uploaded in parts. `None` (test skipped)
    /// when python3 cannot run outside CI.
    pub fn start(store: &Path, token: &str, lfs_from: u64, multipart_over: u64) -> Option<Self> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .ancestors()
            .find_map(|dir| {
                let script = dir.join("tests/python/fake_hub_upload.py");
                script.exists().then_some(script)
            })
            .expect("tests/python/fake_hub_upload.py above the crate");
        let child = Command::new("python3")
            .arg(script)
            .arg(store)
            .args([token, &lfs_from.to_string(), &multipart_over.to_string()])
            .stdout(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("CI=true but python3 cannot run: {e}")
            }
            Err(e) => {
                eprintln!("SKIPPED: python3 cannot run ({e})");
                return None;
            }
        };
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .strip_prefix("PORT ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("fake hub did not start: {line:?}"));
        Some(FakeHub {
            child,
            port,
            store: store.to_path_buf(),
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn repo(&self, repo: &str) -> PathBuf {
        self.store.join("repos").join(repo)
    }

    /// Every request the hub saw, oldest first.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.store.join("requests.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}
