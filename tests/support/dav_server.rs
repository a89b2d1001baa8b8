//! A real WebDAV server (wsgidav) on 127.0.0.1 with basic auth, for the tests of plugins that
//! speak HTTP to a file server (the `http-store` storage plugin, the publish scaffold).
//!
//! Needs `wsgidav` (`pip install wsgidav==4.3.3 cheroot==11.1.2`, see .ci/run): without it
//! [`DavServer::start`] returns `None` (the test prints SKIPPED), and panics under CI=true.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const USER: &str = "alice";
/// Distinctive, so any leak into the output is found by a plain substring search.
pub const PASSWORD: &str = "pw-Zq8v!secret-31337";

/// A wsgidav server on 127.0.0.1 serving a temporary directory at `/dav` with basic auth.
pub struct DavServer {
    child: Child,
    pub port: u16,
    /// The server's files: what the plugin stored, checked without going through the plugin.
    pub root: PathBuf,
    _dir: tempfile::TempDir,
}

impl DavServer {
    /// `None` (test skipped) when wsgidav is not installed, except under CI=true.
    pub fn start() -> Option<DavServer> {
        let installed = Command::new("wsgidav")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!(
                    "CI=true but `wsgidav` is not installed: .ci/run must \
                     `pip install wsgidav==4.3.3 cheroot==11.1.2`"
                );
            }
            eprintln!(
                "SKIPPED: wsgidav not installed (pip install wsgidav==4.3.3 cheroot==11.1.2)"
            );
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let config = dir.path().join("wsgidav.yaml");
        std::fs::write(
            &config,
            format!(
                "host: 127.0.0.1\nport: {port}\nprovider_mapping:\n  \"/dav\": {root:?}\n\
                 http_authenticator:\n  accept_basic: true\n  accept_digest: false\n  \
                 default_to_digest: false\nsimple_dc:\n  user_mapping:\n    \"*\":\n      \
                 {USER:?}:\n        password: {PASSWORD:?}\nverbose: 1\n",
                root = root.display().to_string(),
            ),
        )
        .unwrap();
        let child = Command::new("wsgidav")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start wsgidav");
        let server = DavServer {
            child,
            port,
            root,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !server.answers() {
            assert!(
                Instant::now() < deadline,
                "wsgidav did not answer on port {port} in 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(server)
    }

    /// Whether the server answers HTTP (not only accepts connections).
    fn answers(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let request = format!(
            "OPTIONS /dav/ HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
            self.port
        );
        let mut reply = [0u8; 12];
        stream.write_all(request.as_bytes()).is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && reply.starts_with(b"HTTP/1.1")
    }

    pub fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for DavServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
