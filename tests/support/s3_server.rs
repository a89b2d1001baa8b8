//! A real S3-compatible server for tests: moto's standalone server (`pip install
//! 'moto[server]'`), started on 127.0.0.1 on a free port and killed when dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct S3Server {
    child: Child,
    pub port: u16,
}

impl S3Server {
    pub fn start() -> S3Server {
        Self::start_with_env(&[])
    }

    /// With extra environment for moto, e.g. `INITIAL_NO_AUTH_ACTION_COUNT=0`, which makes it
    /// check access keys against its (empty) IAM: every request's credentials are rejected.
    pub fn start_with_env(env: &[(&str, &str)]) -> S3Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("pick a free port")
            .port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            // Lets multipart tests use small parts (real S3 needs 5 MiB).
            .env("S3_UPLOAD_PART_MIN_SIZE", "1024")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server: install it with pip install 'moto[server]==5.2.1' (see .ci/run)");
        let mut server = S3Server { child, port };
        // Ready once it answers a request: its port can accept connections before the app
        // serves them (an early request then reads an empty response).
        let deadline = Instant::now() + Duration::from_secs(60);
        while server.try_raw("GET", "/", &[], b"").is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("moto_server on port {port} exited before serving: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer on port {port} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Sends one raw HTTP/1.1 request; returns the status. moto checks no signatures, but treats
    /// a request without an `Authorization` header as anonymous (denied on object writes), so
    /// one with a well-formed but unsigned header is sent.
    pub fn raw(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> u16 {
        self.try_raw(method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// [`S3Server::raw`], or what went wrong instead of a status.
    fn try_raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<u16, String> {
        let io = |e: std::io::Error| e.to_string();
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).map_err(io)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io)?;
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential=test-access-key/20260101/us-east-1/s3/aws4_request, \
             SignedHeaders=host, Signature=0000\r\n",
            self.port,
            body.len()
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).map_err(io)?;
        stream.write_all(body).map_err(io)?;
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("no HTTP status in {response:?}"))
    }

    pub fn create_bucket(&self, bucket: &str) {
        let status = self.raw("PUT", &format!("/{bucket}"), &[], b"");
        assert_eq!(status, 200, "create bucket {bucket}");
    }

    /// Settings pointing at this server (the credentials are test values moto accepts).
    pub fn settings(&self) -> ferrotune::storage::s3::S3Settings {
        let endpoint = self.endpoint();
        ferrotune::storage::s3::S3Settings::from_lookup(|name| {
            Some(match name {
                "AWS_ACCESS_KEY_ID" => "test-access-key".to_string(),
                "AWS_SECRET_ACCESS_KEY" => SECRET.to_string(),
                "AWS_REGION" => "us-east-1".to_string(),
                "AWS_ENDPOINT_URL" => endpoint.clone(),
                _ => return None,
            })
        })
        .unwrap()
    }
}

/// The secret used in tests; no log line or error may contain it.
pub const SECRET: &str = "test-secret-do-not-print";

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
