//! The blocking HTTP client over `wasi:http` that storage and publish plugins share (features
//! `storage` and `publish`; their modules re-export it as `storage::http` and add
//! `publish::http::send`). Request bodies can be streamed from a host file ([`BodyReader`]) or
//! any [`Read`], and response bodies into a [`BodyWriter`] chunk by chunk, so transfer size is
//! independent of plugin memory. The host decides which authorities a request may reach; a
//! refused one fails with [`Error::Denied`].

use std::fmt;
use std::io::Read;

use crate::http_bindings::ferrotune::plugin::types::PluginError;
use crate::http_bindings::wasi::http::outgoing_handler;
use crate::http_bindings::wasi::http::types::{
    ErrorCode, Fields, IncomingBody, IncomingResponse, Method, OutgoingBody, OutgoingRequest,
    RequestOptions, Scheme,
};
use crate::http_bindings::wasi::io::streams::{OutputStream, StreamError};

/// An upload body: a local file the host opened for reading. `read` returns the next chunk
/// (empty at the end).
pub use crate::http_bindings::ferrotune::plugin::host_files::BodyReader;
/// A download target: a local file the host opened for writing, renamed into place only when
/// the call succeeds.
pub use crate::http_bindings::ferrotune::plugin::host_files::BodyWriter;

/// Largest chunk the host hands out per `BodyReader::read`.
pub const MAX_CHUNK: u32 = 4 << 20;
/// Buffer of a [`Body::Stream`] upload.
const STREAM_CHUNK: usize = 1 << 20;

/// What a storage or publish call returns on failure. The host retries [`Error::Other`] with
/// backoff and reports the others at once, so classify honestly: wrong credentials are
/// [`Error::InvalidConfig`] (naming the config key to fix), a network hiccup or a 5xx is
/// [`Error::Other`]. Never put a secret in a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The configuration is unusable or rejected by the server; the message names the key.
    InvalidConfig(String),
    /// The object does not exist.
    NotFound(String),
    /// The host refused a request (an authority the job does not allow).
    Denied(String),
    /// Anything else; a later attempt may succeed.
    Other(String),
}

impl Error {
    /// The message without the kind.
    pub fn into_message(self) -> String {
        match self {
            Error::InvalidConfig(m) | Error::NotFound(m) | Error::Denied(m) | Error::Other(m) => m,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidConfig(m) => write!(f, "invalid config: {m}"),
            Error::NotFound(m) => write!(f, "not found: {m}"),
            Error::Denied(m) => write!(f, "denied: {m}"),
            Error::Other(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

impl From<PluginError> for Error {
    fn from(e: PluginError) -> Self {
        match e {
            PluginError::InvalidConfig(m) => Error::InvalidConfig(m),
            PluginError::NotFound(m) => Error::NotFound(m),
            PluginError::Denied(m) => Error::Denied(m),
            PluginError::Other(m) => Error::Other(m),
        }
    }
}

impl From<Error> for PluginError {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidConfig(m) => PluginError::InvalidConfig(m),
            Error::NotFound(m) => PluginError::NotFound(m),
            Error::Denied(m) => PluginError::Denied(m),
            Error::Other(m) => PluginError::Other(m),
        }
    }
}

/// An `http://` or `https://` URL split the way `wasi:http` wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub https: bool,
    /// `host[:port]`, as written.
    pub authority: String,
    /// Path without a trailing `/` (empty for the root).
    pub path: String,
}

impl Url {
    /// Parses `http[s]://authority[/path]` (no query, fragment or user info).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (https, rest) = if let Some(rest) = text.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = text.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(format!("{text:?} is not an http:// or https:// URL"));
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.contains('@') {
            // Not echoed: the user info may hold a password.
            return Err(
                "user info in the URL is not allowed; put credentials in the config \
                        (secrets) instead"
                    .into(),
            );
        }
        if authority.is_empty() {
            return Err(format!("{text:?} has no host"));
        }
        if path.contains(['?', '#']) {
            return Err(format!("{text:?}: a query or fragment is not allowed"));
        }
        Ok(Url {
            https,
            authority: authority.to_string(),
            path: format!("/{}", path.trim_matches('/'))
                .trim_end_matches('/')
                .to_string(),
        })
    }

    /// This URL with `/`-separated `key` appended, each segment percent-encoded.
    pub fn join(&self, key: &str) -> Url {
        let mut path = self.path.clone();
        for segment in key.split('/').filter(|s| !s.is_empty()) {
            path.push('/');
            path.push_str(&encode_segment(segment));
        }
        Url {
            https: self.https,
            authority: self.authority.clone(),
            path,
        }
    }

    /// The path to send (`/` for the root).
    pub fn path_or_root(&self) -> &str {
        if self.path.is_empty() {
            "/"
        } else {
            &self.path
        }
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority, self.path_or_root())
    }
}

/// Percent-encodes one path segment (RFC 3986 unreserved characters pass).
pub fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes (invalid escapes are kept as written).
pub fn decode_percent(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a request sends as its body.
pub enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// Streamed from a host file, chunk by chunk (`Content-Length` is its size).
    File(&'a BodyReader),
    /// Exactly `len` bytes from the reader, chunk by chunk (`Content-Length` is `len`).
    Stream(&'a mut dyn Read, u64),
}

/// Timeouts of one request. `first_byte_ms` is extended by 1 ms per KB of request body (the
/// response starts only after the upload).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect_ms: u64,
    pub first_byte_ms: u64,
    pub between_bytes_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect_ms: 30_000,
            first_byte_ms: 120_000,
            between_bytes_ms: 60_000,
        }
    }
}

/// An HTTP request: method, URL, headers.
pub struct Request {
    method: Method,
    https: bool,
    authority: String,
    /// Path, with the query if any (`/` for the root).
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    timeouts: Timeouts,
}

impl Request {
    /// `method` is any HTTP method (`"PROPFIND"` and `"MKCOL"` included).
    pub fn new(method: &str, url: Url) -> Self {
        let path = url.path_or_root().to_string();
        Self::to(method, url.https, url.authority, path)
    }

    /// A request to `path_with_query` at `authority` (URLs that [`Url`] refuses, such as the
    /// presigned upload URLs a Hub hands out, whose signature is in the query).
    pub fn to(method: &str, https: bool, authority: String, path_with_query: String) -> Self {
        let method = match method {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "PUT" => Method::Put,
            "POST" => Method::Post,
            "DELETE" => Method::Delete,
            "OPTIONS" => Method::Options,
            "PATCH" => Method::Patch,
            other => Method::Other(other.to_string()),
        };
        Request {
            method,
            https,
            authority,
            path: path_with_query,
            headers: Vec::new(),
            timeouts: Timeouts::default(),
        }
    }

    pub fn header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    pub fn timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    fn method_name(&self) -> &str {
        match &self.method {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Put => "PUT",
            Method::Post => "POST",
            Method::Delete => "DELETE",
            Method::Options => "OPTIONS",
            Method::Patch => "PATCH",
            Method::Connect => "CONNECT",
            Method::Trace => "TRACE",
            Method::Other(m) => m,
        }
    }

    /// `METHOD scheme://authority/path` (the query left out: presigned URLs carry signatures
    /// there), for messages.
    fn what(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        let path = self.path.split('?').next().unwrap_or_default();
        format!("{} {scheme}://{}{path}", self.method_name(), self.authority)
    }

    /// Sends the request with `body` and waits for the response head. Transport failures are
    /// [`Error::Other`] (retryable) except a host refusal, which is [`Error::Denied`]. An
    /// error answer (4xx/5xx) that arrives before the whole body was sent is returned as the
    /// response: it explains more than a broken pipe.
    pub fn send(self, body: Body<'_>) -> Result<Response, Error> {
        let what = self.what();
        let fail = |e: String| Error::Other(format!("{what}: {e}"));
        let length = match &body {
            Body::Empty => None,
            Body::Bytes(bytes) => Some(bytes.len() as u64),
            Body::File(reader) => Some(reader.size()),
            Body::Stream(_, len) => Some(*len),
        };
        let mut headers = self.headers.clone();
        if let Some(length) = length {
            headers.push(("content-length".into(), length.to_string().into_bytes()));
        }
        let fields = Fields::from_list(&headers).map_err(|e| fail(format!("bad header: {e:?}")))?;
        let request = OutgoingRequest::new(fields);
        let set = |ok: Result<(), ()>, part: &str| ok.map_err(|()| fail(format!("invalid {part}")));
        set(request.set_method(&self.method), "method")?;
        set(
            request.set_scheme(Some(if self.https {
                &Scheme::Https
            } else {
                &Scheme::Http
            })),
            "scheme",
        )?;
        set(request.set_authority(Some(&self.authority)), "authority")?;
        set(request.set_path_with_query(Some(&self.path)), "path")?;
        // Without a body the request is sent as is; asking for one would make it chunked.
        let outgoing = match body {
            Body::Empty => None,
            _ => Some(
                request
                    .body()
                    .map_err(|()| fail("request body taken twice".into()))?,
            ),
        };

        // The response's first byte comes after the whole body went out: allow the upload at
        // least 1 MB/s on top of the configured wait.
        let first_byte_ms = self
            .timeouts
            .first_byte_ms
            .saturating_add(length.unwrap_or(0) / 1_000);
        let options = RequestOptions::new();
        let ns = |ms: u64| ms.saturating_mul(1_000_000);
        // The host may refuse options it does not support; the defaults then apply.
        let _ = options.set_connect_timeout(Some(ns(self.timeouts.connect_ms)));
        let _ = options.set_first_byte_timeout(Some(ns(first_byte_ms)));
        let _ = options.set_between_bytes_timeout(Some(ns(self.timeouts.between_bytes_ms)));

        // Send first, then stream the body: the host forwards it as it is written.
        let pending =
            outgoing_handler::handle(request, Some(options)).map_err(|e| error_code(&what, e))?;
        if let Some(outgoing) = outgoing {
            if let Err(e) = write_body(&outgoing, body) {
                // The response (if any) explains the failure better, e.g. a 401 before the body.
                drop(outgoing);
                return match wait(&pending) {
                    Ok(response) if response.status() >= 400 => Ok(Response::new(response, what)),
                    Ok(response) => Err(fail(format!(
                        "{e} while sending the body (the server answered {} early)",
                        response.status()
                    ))),
                    Err(code) => Err(fail(format!("{e} while sending the body ({code:?})"))),
                };
            }
            OutgoingBody::finish(outgoing, None).map_err(|e| error_code(&what, e))?;
        }
        let response = wait(&pending).map_err(|e| error_code(&what, e))?;
        Ok(Response::new(response, what))
    }
}

fn wait(pending: &outgoing_handler::FutureIncomingResponse) -> Result<IncomingResponse, ErrorCode> {
    loop {
        match pending.get() {
            Some(Ok(result)) => return result,
            Some(Err(())) => return Err(ErrorCode::InternalError(Some("response taken".into()))),
            None => pending.subscribe().block(),
        }
    }
}

fn write_body(outgoing: &OutgoingBody, body: Body<'_>) -> Result<(), String> {
    let stream = outgoing
        .write()
        .map_err(|()| "request body stream taken twice".to_string())?;
    match body {
        Body::Empty => {}
        Body::Bytes(bytes) => write_all(&stream, bytes)?,
        Body::File(reader) => loop {
            let chunk = reader
                .read(MAX_CHUNK)
                .map_err(|e| format!("reading the upload: {}", Error::from(e)))?;
            if chunk.is_empty() {
                break;
            }
            write_all(&stream, &chunk)?;
        },
        Body::Stream(reader, len) => {
            let mut left = len;
            let mut buf = vec![0u8; (len as usize).min(STREAM_CHUNK)];
            while left > 0 {
                let want = (left as usize).min(buf.len());
                let n = reader
                    .read(&mut buf[..want])
                    .map_err(|e| format!("reading the upload: {e}"))?;
                if n == 0 {
                    return Err(format!("the file ended {left} bytes early"));
                }
                write_all(&stream, &buf[..n])?;
                left -= n as u64;
            }
        }
    }
    // No final flush: every byte is queued once `write` returned, and with a known
    // Content-Length the host's HTTP client may close the stream as soon as it took the last
    // byte, so a flush could report "closed" for a body that was sent whole.
    Ok(())
}

/// Writes all of `bytes`, waiting whenever the host's buffer is full.
fn write_all(stream: &OutputStream, mut bytes: &[u8]) -> Result<(), String> {
    while !bytes.is_empty() {
        let permitted = stream.check_write().map_err(stream_error)?;
        if permitted == 0 {
            stream.subscribe().block();
            continue;
        }
        let n = (permitted as usize).min(bytes.len());
        stream.write(&bytes[..n]).map_err(stream_error)?;
        bytes = &bytes[n..];
    }
    Ok(())
}

fn stream_error(e: StreamError) -> String {
    match e {
        StreamError::Closed => "the connection closed".into(),
        StreamError::LastOperationFailed(e) => e.to_debug_string(),
    }
}

fn error_code(what: &str, e: ErrorCode) -> Error {
    match e {
        ErrorCode::HttpRequestDenied => Error::Denied(format!(
            "{what}: the host refused the request (the job does not allow this host)"
        )),
        ErrorCode::ConnectionRefused => Error::Other(format!("{what}: connection refused")),
        other => Error::Other(format!("{what}: {other:?}")),
    }
}

/// A response whose head arrived; read the body with [`Response::bytes`] or stream it with
/// [`Response::copy_to`].
pub struct Response {
    inner: IncomingResponse,
    what: String,
}

impl Response {
    fn new(inner: IncomingResponse, what: String) -> Self {
        Response { inner, what }
    }

    pub fn status(&self) -> u16 {
        self.inner.status()
    }

    /// The first value of header `name` (case-insensitive), as text.
    pub fn header(&self, name: &str) -> Option<String> {
        let name = name.to_ascii_lowercase();
        self.inner
            .headers()
            .get(&name)
            .into_iter()
            .next()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    /// Every header, in the order received, values as text.
    pub fn headers(&self) -> Vec<(String, String)> {
        self.inner
            .headers()
            .entries()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect()
    }

    /// `METHOD URL` of the request (without its query), for messages.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// The whole body, refusing more than `limit` bytes (for small bodies: listings, errors).
    pub fn bytes(self, limit: usize) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        let what = self.what.clone();
        self.for_each_chunk(|chunk| {
            if out.len() + chunk.len() > limit {
                return Err(Error::Other(format!(
                    "{what}: response body larger than {limit} bytes"
                )));
            }
            out.extend_from_slice(chunk);
            Ok(())
        })?;
        Ok(out)
    }

    /// Streams the body into `writer`; returns the bytes copied.
    pub fn copy_to(self, writer: &BodyWriter) -> Result<u64, Error> {
        let mut copied = 0u64;
        self.for_each_chunk(|chunk| {
            writer.write(chunk).map_err(Error::from)?;
            copied += chunk.len() as u64;
            Ok(())
        })?;
        Ok(copied)
    }

    fn for_each_chunk(self, mut f: impl FnMut(&[u8]) -> Result<(), Error>) -> Result<(), Error> {
        let what = self.what;
        let body = self
            .inner
            .consume()
            .map_err(|()| Error::Other(format!("{what}: response body taken twice")))?;
        {
            let stream = body
                .stream()
                .map_err(|()| Error::Other(format!("{what}: response stream taken twice")))?;
            loop {
                match stream.blocking_read(MAX_CHUNK as u64) {
                    Ok(chunk) => f(&chunk)?,
                    Err(StreamError::Closed) => break,
                    Err(e) => {
                        return Err(Error::Other(format!(
                            "{what}: reading the response: {}",
                            stream_error(e)
                        )))
                    }
                }
            }
        }
        // Trailers are not used; finishing releases the body.
        drop(IncomingBody::finish(body));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_and_join_with_encoding() {
        let url = Url::parse("http://127.0.0.1:8080/dav/").unwrap();
        assert_eq!(url.authority, "127.0.0.1:8080");
        assert_eq!(url.path, "/dav");
        let joined = url.join("a b/c%d.bin");
        assert_eq!(joined.path, "/dav/a%20b/c%25d.bin");
        assert_eq!(
            joined.to_string(),
            "http://127.0.0.1:8080/dav/a%20b/c%25d.bin"
        );
        assert_eq!(Url::parse("https://h").unwrap().path_or_root(), "/");
        assert!(Url::parse("ftp://h/x").is_err());
        let err = Url::parse("http://u:pass-word@h/x").unwrap_err();
        assert!(!err.contains("pass-word"), "{err}");
    }

    #[test]
    fn percent_decoding_inverts_encoding() {
        for s in ["plain", "a b", "ü/%x", "100%"] {
            assert_eq!(decode_percent(&encode_segment(s)), s);
        }
        assert_eq!(decode_percent("%zz%2"), "%zz%2");
    }
}
