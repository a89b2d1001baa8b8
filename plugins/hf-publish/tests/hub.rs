//! The Hub upload protocol against a local fake Hub (tests/python/fake_hub_upload.py): repo
//! creation, regular and LFS files (single PUT and multipart), one commit; the stored files are
//! byte-identical to the local ones, the token reaches only the Hub's own URLs, and a wrong
//! token or a dead endpoint is a clear error.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};

#[path = "../../../tests/support/fake_hub.rs"]
#[allow(dead_code)]
mod fake_hub;

use fake_hub::FakeHub;
use ferrotune_plugin_hf_publish::hub::{
    Body, FileSource, Hub, HubError, Request, Response, Transport, UploadFile,
};

/// HTTP/1.1 over a fresh TCP connection per request (`Connection: close`).
struct Tcp;

impl Transport for Tcp {
    fn send(&mut self, request: Request<'_>) -> Result<Response, String> {
        let rest = request
            .url
            .strip_prefix("http://")
            .ok_or("only http:// in tests")?;
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let path = if path.is_empty() { "/" } else { path };
        let mut stream = TcpStream::connect(authority).map_err(|e| format!("{authority}: {e}"))?;
        let mut head = format!(
            "{} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Length: {}\r\n",
            request.method,
            request.body.len()
        );
        for (k, v) in &request.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        stream
            .write_all(head.as_bytes())
            .map_err(|e| e.to_string())?;
        match request.body {
            Body::Empty => {}
            Body::Bytes(b) => stream.write_all(&b).map_err(|e| e.to_string())?,
            Body::Stream(reader, len) => {
                let copied =
                    std::io::copy(&mut reader.take(len), &mut stream).map_err(|e| e.to_string())?;
                assert_eq!(copied, len, "the body reader ended early");
            }
        }
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).map_err(|e| e.to_string())?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {line:?}"))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            reader.read_line(&mut line).map_err(|e| e.to_string())?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let mut body = Vec::new();
        reader.read_to_end(&mut body).map_err(|e| e.to_string())?;
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

struct Dir(PathBuf);

impl FileSource for Dir {
    fn open(&mut self, path: &str) -> std::io::Result<Box<dyn Read + '_>> {
        Ok(Box::new(std::fs::File::open(self.0.join(path))?))
    }
}

const TOKEN: &str = "hf_test_secret_token";

/// Starts the fake Hub: files of at least 1 MB go through LFS, objects over 2 MB multipart.
fn fake_hub(store: &Path) -> Option<FakeHub> {
    FakeHub::start(store, TOKEN, 1_000_000, 2_000_000)
}

fn pseudo_random(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn a_push_stores_every_file_byte_for_byte_in_one_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(hub) = fake_hub(&tmp.path().join("store")) else {
        return;
    };
    let local = tmp.path().join("save");
    std::fs::create_dir_all(local.join("sub")).unwrap();
    let files = [
        ("config.json", br#"{"model_type": "llama"}"#.to_vec()),
        ("sub/tokenizer.json", pseudo_random(20_000, 1)),
        ("adapter_model.safetensors", pseudo_random(1_500_000, 2)), // LFS, one PUT
        ("model.Q8_0.gguf", pseudo_random(5_000_001, 3)),           // LFS, 3 parts
        ("empty.txt", Vec::new()),
    ];
    for (name, bytes) in &files {
        std::fs::write(local.join(name), bytes).unwrap();
    }
    let upload: Vec<UploadFile> = files
        .iter()
        .map(|(name, _)| UploadFile {
            local: name.to_string(),
            path_in_repo: name.to_string(),
        })
        .collect();
    let endpoint = format!("http://127.0.0.1:{}/", hub.port);
    let mut client = Hub::new(&endpoint, TOKEN, Tcp);
    client.create_repo("me/tiny-model", false).unwrap();
    client.create_repo("me/tiny-model", false).unwrap(); // exists: fine
    let info = client
        .upload(
            "me/tiny-model",
            "main",
            &upload,
            &mut Dir(local.clone()),
            "Upload model trained with ferrotune",
        )
        .unwrap();
    assert!(
        info.commit_url.contains("/me/tiny-model/commit/"),
        "{info:?}"
    );
    for (name, bytes) in &files {
        let stored = std::fs::read(hub.store.join("repos/me/tiny-model").join(name)).unwrap();
        assert!(&stored == bytes, "{name} differs after the push");
    }
    let log = hub.requests();
    let storage_puts: Vec<&serde_json::Value> =
        log.iter().filter(|r| r["method"] == "PUT").collect();
    assert_eq!(storage_puts.len(), 1 + 3, "one single PUT and three parts");
    assert!(
        storage_puts.iter().all(|r| r["auth"] == false),
        "the token must not reach storage URLs"
    );
    assert!(log
        .iter()
        .filter(|r| r["method"] == "POST")
        .all(|r| r["auth"] == true));
    let commits = std::fs::read_to_string(hub.store.join("commits.jsonl")).unwrap();
    assert_eq!(commits.lines().count(), 1, "one commit for all files");

    // Pushing again uploads no LFS bytes: the Hub already has the objects.
    let before = log.len();
    client
        .upload("me/tiny-model", "main", &upload, &mut Dir(local), "again")
        .unwrap();
    let again = hub.requests();
    assert!(again[before..].iter().all(|r| r["method"] != "PUT"));
}

#[test]
fn a_wrong_token_or_a_dead_endpoint_is_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(hub) = fake_hub(&tmp.path().join("store")) else {
        return;
    };
    let endpoint = format!("http://127.0.0.1:{}", hub.port);
    let mut client = Hub::new(&endpoint, "hf_wrong_token", Tcp);
    let err = client.create_repo("me/x", false).unwrap_err();
    assert!(matches!(err, HubError::Auth(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("--hub_token") && !text.contains("hf_wrong_token"),
        "{text}"
    );

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut dead = Hub::new(&format!("http://127.0.0.1:{port}"), TOKEN, Tcp);
    let err = dead.create_repo("me/x", false).unwrap_err();
    assert!(matches!(err, HubError::Unreachable(_)), "{err:?}");

    let err = Hub::new(&endpoint, TOKEN, Tcp)
        .create_repo("me/bad name", false)
        .unwrap_err();
    assert!(err.to_string().contains("not a Hub repository id"), "{err}");
}
