//! The Hugging Face Hub's upload protocol, as `huggingface_hub.create_commit` speaks it:
//!
//! 1. `POST {endpoint}/api/repos/create` (`{"name", "organization", "private"}`; 409 = exists);
//! 2. `POST {endpoint}/api/models/{repo}/preupload/{revision}` with each file's path, size and
//!    first 512 bytes (base64): the Hub answers `regular` or `lfs` per file;
//! 3. LFS files: `POST {endpoint}/{repo}.git/info/lfs/objects/batch` (git-lfs batch API, sha256
//!    oids) gives an upload action per object the Hub lacks: one `PUT` of the whole file, or,
//!    when the action's header carries `chunk_size`, a `PUT` per numbered part URL and a
//!    completion `POST` with the parts' ETags; then the optional `verify` action;
//! 4. `POST {endpoint}/api/models/{repo}/commit/{revision}` with an ndjson body: a `header` line
//!    (summary, description), a `file` line per regular file (content in base64) and an
//!    `lfsFile` line per LFS file (sha256 oid and size). One commit for all files.
//!
//! The token goes only to URLs of the endpoint's origin (`Authorization: Bearer …`), never to
//! the storage URLs the LFS actions name, and never into an error message. Transport and file
//! access are traits, so the same code runs over `wasi:http` in the plugin and over plain TCP
//! in tests.

use std::fmt;
use std::io::Read;

use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Files per preupload / LFS batch request (huggingface_hub's chunk size).
const BATCH: usize = 256;
/// Bytes of each file the preupload call sees.
const SAMPLE: usize = 512;
/// Largest file this client inlines into a commit as base64 (the Hub routes anything sizable to
/// LFS; a larger "regular" answer is refused rather than held in memory).
pub const MAX_INLINE: u64 = 50 << 20;
/// Read size when hashing and streaming files.
const CHUNK: usize = 1 << 20;
const LFS_JSON: &str = "application/vnd.git-lfs+json";

/// An HTTP request body.
pub enum Body<'a> {
    Empty,
    Bytes(Vec<u8>),
    /// Exactly `len` bytes from the reader, streamed by the transport.
    Stream(&'a mut dyn Read, u64),
}

impl Body<'_> {
    pub fn len(&self) -> u64 {
        match self {
            Body::Empty => 0,
            Body::Bytes(b) => b.len() as u64,
            Body::Stream(_, len) => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct Request<'a> {
    pub method: &'static str,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Body<'a>,
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one HTTP request and returns the whole response (`wasi:http` in the plugin).
pub trait Transport {
    /// A transport failure (connection refused, timeout) is an `Err` with a message.
    fn send(&mut self, request: Request<'_>) -> Result<Response, String>;
}

/// Reads the files to upload (the host's `open-artefact` in the plugin).
pub trait FileSource {
    fn open(&mut self, path: &str) -> std::io::Result<Box<dyn Read + '_>>;
}

/// One file of the commit: read from `local` through the [`FileSource`], stored at
/// `path_in_repo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadFile {
    pub local: String,
    pub path_in_repo: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubError {
    /// The Hub refused the token (401/403).
    Auth(String),
    /// The endpoint could not be reached.
    Unreachable(String),
    /// A local file could not be read.
    Io(String),
    /// The Hub answered with an error status or something this client does not understand.
    Hub(String),
}

impl fmt::Display for HubError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HubError::Auth(m) | HubError::Unreachable(m) | HubError::Io(m) | HubError::Hub(m) => {
                f.write_str(m)
            }
        }
    }
}

impl std::error::Error for HubError {}

/// What the commit call answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    pub commit_url: String,
    pub commit_oid: String,
}

/// A file's size, sha256 and first bytes, from one pass over it.
struct Hashed {
    file: UploadFile,
    size: u64,
    sha256: String,
    sample: Vec<u8>,
}

pub struct Hub<T> {
    endpoint: String,
    token: String,
    transport: T,
}

/// Checks `owner/name` (or `name`) as the Hub spells repository ids.
pub fn check_repo_id(repo_id: &str) -> Result<(), String> {
    let parts: Vec<&str> = repo_id.split('/').collect();
    let ok_part = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with(['.', '-'])
            && !p.ends_with('.')
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if parts.len() > 2 || !parts.iter().all(|p| ok_part(p)) {
        return Err(format!(
            "{repo_id:?} is not a Hub repository id: use owner/name with letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

/// `scheme://authority` of a URL.
fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

/// A short, token-free description of an error response.
fn describe(resp: &Response) -> String {
    let text = String::from_utf8_lossy(&resp.body);
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| text.chars().take(300).collect());
    format!("HTTP {}: {}", resp.status, message.trim())
}

fn json_of(resp: &Response, what: &str) -> Result<Value, HubError> {
    serde_json::from_slice(&resp.body)
        .map_err(|e| HubError::Hub(format!("{what}: the Hub's answer is not JSON ({e})")))
}

impl<T: Transport> Hub<T> {
    /// `endpoint`: the Hub's base URL (`https://huggingface.co`, or `HF_ENDPOINT`).
    pub fn new(endpoint: &str, token: &str, transport: T) -> Self {
        Hub {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token: token.to_string(),
            transport,
        }
    }

    pub fn transport(&mut self) -> &mut T {
        &mut self.transport
    }

    /// Sends `request`, adding the token when the URL is on the endpoint's origin.
    fn send(&mut self, mut request: Request<'_>, what: &str) -> Result<Response, HubError> {
        if origin(&request.url) == origin(&self.endpoint) {
            request
                .headers
                .push(("authorization".into(), format!("Bearer {}", self.token)));
        }
        let resp = self
            .transport
            .send(request)
            .map_err(|e| HubError::Unreachable(format!("{what}: {e}")))?;
        match resp.status {
            200..=299 => Ok(resp),
            401 | 403 => Err(HubError::Auth(format!(
                "{what}: the Hub refused the token ({}); pass a token with write access (--hub_token or HF_TOKEN)",
                describe(&resp)
            ))),
            _ => Err(HubError::Hub(format!("{what}: {}", describe(&resp)))),
        }
    }

    fn post_json(&mut self, url: String, body: &Value, what: &str) -> Result<Response, HubError> {
        self.send(
            Request {
                method: "POST",
                url,
                headers: vec![("content-type".into(), "application/json".into())],
                body: Body::Bytes(body.to_string().into_bytes()),
            },
            what,
        )
    }

    /// Creates the model repository, or does nothing if it exists.
    pub fn create_repo(&mut self, repo_id: &str, private: bool) -> Result<(), HubError> {
        check_repo_id(repo_id).map_err(HubError::Hub)?;
        let (org, name) = match repo_id.split_once('/') {
            Some((org, name)) => (Some(org), name),
            None => (None, repo_id),
        };
        let body = json!({"name": name, "organization": org, "private": private});
        let url = format!("{}/api/repos/create", self.endpoint);
        match self.post_json(url, &body, "create repository") {
            Ok(_) => Ok(()),
            Err(HubError::Hub(m)) if m.contains("HTTP 409") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Uploads `files` to `repo_id` at `revision` in one commit.
    pub fn upload(
        &mut self,
        repo_id: &str,
        revision: &str,
        files: &[UploadFile],
        source: &mut dyn FileSource,
        message: &str,
    ) -> Result<CommitInfo, HubError> {
        check_repo_id(repo_id).map_err(HubError::Hub)?;
        if files.is_empty() {
            return Err(HubError::Hub("nothing to upload".into()));
        }
        let hashed: Vec<Hashed> = files
            .iter()
            .map(|f| hash_file(f, source))
            .collect::<Result<_, _>>()?;
        let modes = self.preupload(repo_id, revision, &hashed)?;
        let lfs: Vec<&Hashed> = hashed
            .iter()
            .filter(|h| modes[&h.file.path_in_repo] == Mode::Lfs)
            .collect();
        for batch in lfs.chunks(BATCH) {
            self.upload_lfs(repo_id, revision, batch, source)?;
        }
        let mut ndjson = Vec::new();
        let line = |v: Value, out: &mut Vec<u8>| {
            out.extend(v.to_string().into_bytes());
            out.push(b'\n');
        };
        line(
            json!({"key": "header", "value": {"summary": message, "description": ""}}),
            &mut ndjson,
        );
        for h in &hashed {
            match modes[&h.file.path_in_repo] {
                Mode::Ignore => {}
                Mode::Lfs => line(
                    json!({"key": "lfsFile", "value": {"path": h.file.path_in_repo, "algo": "sha256", "oid": h.sha256, "size": h.size}}),
                    &mut ndjson,
                ),
                Mode::Regular => {
                    if h.size > MAX_INLINE {
                        return Err(HubError::Hub(format!(
                            "{}: the Hub asked to inline {} bytes in the commit; this client inlines at most {MAX_INLINE}",
                            h.file.path_in_repo, h.size
                        )));
                    }
                    let mut content = Vec::with_capacity(h.size as usize);
                    open(source, &h.file)?
                        .read_to_end(&mut content)
                        .map_err(|e| io_error(&h.file, e))?;
                    if content.len() as u64 != h.size {
                        return Err(HubError::Io(format!(
                            "{} changed while uploading ({} bytes, then {})",
                            h.file.local,
                            h.size,
                            content.len()
                        )));
                    }
                    let b64 = base64::engine::general_purpose::STANDARD.encode(&content);
                    line(
                        json!({"key": "file", "value": {"content": b64, "path": h.file.path_in_repo, "encoding": "base64"}}),
                        &mut ndjson,
                    );
                }
            }
        }
        let url = format!(
            "{}/api/models/{repo_id}/commit/{}",
            self.endpoint,
            encode_component(revision)
        );
        let resp = self.send(
            Request {
                method: "POST",
                url,
                headers: vec![("content-type".into(), "application/x-ndjson".into())],
                body: Body::Bytes(ndjson),
            },
            "commit",
        )?;
        let v = json_of(&resp, "commit")?;
        Ok(CommitInfo {
            commit_url: v["commitUrl"].as_str().unwrap_or_default().to_string(),
            commit_oid: v["commitOid"].as_str().unwrap_or_default().to_string(),
        })
    }

    fn preupload(
        &mut self,
        repo_id: &str,
        revision: &str,
        hashed: &[Hashed],
    ) -> Result<std::collections::HashMap<String, Mode>, HubError> {
        let mut modes = std::collections::HashMap::new();
        for batch in hashed.chunks(BATCH) {
            let files: Vec<Value> = batch
                .iter()
                .map(|h| {
                    json!({
                        "path": h.file.path_in_repo,
                        "sample": base64::engine::general_purpose::STANDARD.encode(&h.sample),
                        "size": h.size,
                    })
                })
                .collect();
            let url = format!(
                "{}/api/models/{repo_id}/preupload/{}",
                self.endpoint,
                encode_component(revision)
            );
            let resp = self.post_json(url, &json!({"files": files}), "preupload")?;
            let v = json_of(&resp, "preupload")?;
            for f in v["files"].as_array().into_iter().flatten() {
                let path = f["path"].as_str().unwrap_or_default().to_string();
                let mode = if f["shouldIgnore"].as_bool() == Some(true) {
                    Mode::Ignore
                } else {
                    match f["uploadMode"].as_str() {
                        Some("lfs") => Mode::Lfs,
                        Some("regular") => Mode::Regular,
                        other => {
                            return Err(HubError::Hub(format!(
                                "preupload: upload mode {other:?} for {path}"
                            )))
                        }
                    }
                };
                modes.insert(path, mode);
            }
        }
        if let Some(h) = hashed
            .iter()
            .find(|h| !modes.contains_key(&h.file.path_in_repo))
        {
            return Err(HubError::Hub(format!(
                "preupload: the Hub gave no upload mode for {}",
                h.file.path_in_repo
            )));
        }
        Ok(modes)
    }

    fn upload_lfs(
        &mut self,
        repo_id: &str,
        revision: &str,
        batch: &[&Hashed],
        source: &mut dyn FileSource,
    ) -> Result<(), HubError> {
        let objects: Vec<Value> = batch
            .iter()
            .map(|h| json!({"oid": h.sha256, "size": h.size}))
            .collect();
        let body = json!({
            "operation": "upload",
            "transfers": ["basic", "multipart"],
            "objects": objects,
            "hash_algo": "sha256",
            "ref": {"name": revision},
        });
        let resp = self.send(
            Request {
                method: "POST",
                url: format!("{}/{repo_id}.git/info/lfs/objects/batch", self.endpoint),
                headers: vec![
                    ("accept".into(), LFS_JSON.into()),
                    ("content-type".into(), LFS_JSON.into()),
                ],
                body: Body::Bytes(body.to_string().into_bytes()),
            },
            "LFS batch",
        )?;
        let v = json_of(&resp, "LFS batch")?;
        for obj in v["objects"].as_array().into_iter().flatten() {
            let oid = obj["oid"].as_str().unwrap_or_default();
            let Some(h) = batch.iter().find(|h| h.sha256 == oid) else {
                return Err(HubError::Hub(format!(
                    "LFS batch: the Hub answered for unknown object {oid}"
                )));
            };
            if let Some(err) = obj.get("error") {
                return Err(HubError::Hub(format!(
                    "LFS batch: {}: {}",
                    h.file.path_in_repo, err["message"]
                )));
            }
            let actions = &obj["actions"];
            let Some(upload) = actions.get("upload") else {
                continue; // the Hub already has these bytes
            };
            if upload["header"].get("chunk_size").is_some() {
                self.upload_multipart(h, upload, source)?;
            } else {
                let href = action_href(upload, h)?;
                let mut reader = open(source, &h.file)?;
                self.send(
                    Request {
                        method: "PUT",
                        url: href,
                        headers: action_headers(upload),
                        body: Body::Stream(&mut reader, h.size),
                    },
                    &format!("upload of {}", h.file.path_in_repo),
                )?;
            }
            if let Some(verify) = actions.get("verify") {
                let mut headers = action_headers(verify);
                headers.push(("content-type".into(), LFS_JSON.into()));
                self.send(
                    Request {
                        method: "POST",
                        url: action_href(verify, h)?,
                        headers,
                        body: Body::Bytes(
                            json!({"oid": h.sha256, "size": h.size})
                                .to_string()
                                .into_bytes(),
                        ),
                    },
                    &format!("LFS verify of {}", h.file.path_in_repo),
                )?;
            }
        }
        Ok(())
    }

    /// The Hub's multipart LFS transfer: the action header holds `chunk_size` and one URL per
    /// part ("00001", "00002", …); each part is PUT and its ETag sent to the completion URL.
    fn upload_multipart(
        &mut self,
        h: &Hashed,
        upload: &Value,
        source: &mut dyn FileSource,
    ) -> Result<(), HubError> {
        let header = upload["header"].as_object().expect("checked by the caller");
        let chunk_size: u64 = match &header["chunk_size"] {
            Value::String(s) => s.parse().ok(),
            Value::Number(n) => n.as_u64(),
            _ => None,
        }
        .filter(|&c| c > 0)
        .ok_or_else(|| {
            HubError::Hub(format!(
                "LFS multipart: bad chunk_size for {}",
                h.file.path_in_repo
            ))
        })?;
        let mut parts: Vec<(u32, String)> = header
            .iter()
            .filter_map(|(k, v)| Some((k.parse::<u32>().ok()?, v.as_str()?.to_string())))
            .collect();
        parts.sort();
        let expected = h.size.div_ceil(chunk_size);
        if parts.len() as u64 != expected {
            return Err(HubError::Hub(format!(
                "LFS multipart: {} part URLs for {} bytes in chunks of {chunk_size} ({})",
                parts.len(),
                h.size,
                h.file.path_in_repo
            )));
        }
        let mut reader = open(source, &h.file)?;
        let mut etags = Vec::new();
        let mut left = h.size;
        for (number, url) in parts {
            let len = left.min(chunk_size);
            left -= len;
            let mut part = (&mut reader).take(len);
            let resp = self.send(
                Request {
                    method: "PUT",
                    url,
                    headers: Vec::new(),
                    body: Body::Stream(&mut part, len),
                },
                &format!("upload of part {number} of {}", h.file.path_in_repo),
            )?;
            let etag = resp.header("etag").ok_or_else(|| {
                HubError::Hub(format!(
                    "upload of part {number} of {}: no ETag in the answer",
                    h.file.path_in_repo
                ))
            })?;
            etags.push(json!({"partNumber": number, "etag": etag}));
        }
        self.send(
            Request {
                method: "POST",
                url: action_href(upload, h)?,
                headers: vec![
                    ("accept".into(), LFS_JSON.into()),
                    ("content-type".into(), LFS_JSON.into()),
                ],
                body: Body::Bytes(
                    json!({"oid": h.sha256, "parts": etags})
                        .to_string()
                        .into_bytes(),
                ),
            },
            &format!(
                "completion of the multipart upload of {}",
                h.file.path_in_repo
            ),
        )?;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Regular,
    Lfs,
    Ignore,
}

fn action_href(action: &Value, h: &Hashed) -> Result<String, HubError> {
    action["href"].as_str().map(str::to_string).ok_or_else(|| {
        HubError::Hub(format!(
            "LFS batch: an action for {} has no href",
            h.file.path_in_repo
        ))
    })
}

/// The headers an LFS action asks for (string values; the multipart keys are not headers).
fn action_headers(action: &Value) -> Vec<(String, String)> {
    action["header"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| *k != "chunk_size" && k.parse::<u32>().is_err())
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn io_error(file: &UploadFile, e: std::io::Error) -> HubError {
    HubError::Io(format!("cannot read {}: {e}", file.local))
}

fn open<'s>(
    source: &'s mut dyn FileSource,
    file: &UploadFile,
) -> Result<Box<dyn Read + 's>, HubError> {
    source.open(&file.local).map_err(|e| io_error(file, e))
}

fn hash_file(file: &UploadFile, source: &mut dyn FileSource) -> Result<Hashed, HubError> {
    let mut reader = open(source, file)?;
    let mut hasher = Sha256::new();
    let mut sample = Vec::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = reader.read(&mut buf).map_err(|e| io_error(file, e))?;
        if n == 0 {
            break;
        }
        if sample.len() < SAMPLE {
            let take = n.min(SAMPLE - sample.len());
            sample.extend_from_slice(&buf[..take]);
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok(Hashed {
        file: file.clone(),
        size,
        sha256: hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        sample,
    })
}

/// Percent-encodes a path component (a revision such as `refs/pr/1`).
fn encode_component(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_checked() {
        assert!(check_repo_id("org/model-1.5B_v2").is_ok());
        assert!(check_repo_id("model").is_ok());
        for bad in ["", "a/b/c", "org/", "org/..x", "org/na me", "-org/x"] {
            assert!(check_repo_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn origins_and_components() {
        assert_eq!(
            origin("https://huggingface.co/api/x"),
            "https://huggingface.co"
        );
        assert_eq!(origin("http://127.0.0.1:8000"), "http://127.0.0.1:8000");
        assert_ne!(
            origin("http://localhost:1/x"),
            origin("http://127.0.0.1:1/x")
        );
        assert_eq!(encode_component("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(encode_component("main"), "main");
    }

    #[test]
    fn error_descriptions_carry_the_hub_message_not_the_request() {
        let resp = Response {
            status: 403,
            headers: vec![],
            body: br#"{"error":"You don't have the rights"}"#.to_vec(),
        };
        assert_eq!(describe(&resp), "HTTP 403: You don't have the rights");
    }
}
