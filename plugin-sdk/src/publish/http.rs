//! HTTP for publish plugins: [`send`] one request to any `http(s)://` URL (presigned upload URLs
//! with their query included) and get the whole response (bodies of API answers are small);
//! request bodies are streamed from any [`std::io::Read`] so a multi-GB upload never sits in
//! plugin memory. Built on the SDK's shared `wasi:http` client ([`crate::http`]); the host
//! decides which hosts a request may reach.

pub use crate::http::Body;
use crate::http::Request;

/// Largest response body kept (API answers; uploads answer with a few bytes).
const MAX_RESPONSE: usize = 64 << 20;

/// Connect within 30 s; a Hub may take minutes to answer a commit of large files.
const TIMEOUTS: crate::http::Timeouts = crate::http::Timeouts {
    connect_ms: 30_000,
    first_byte_ms: 300_000,
    between_bytes_ms: 120_000,
};

/// A whole response.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// `scheme://authority/path?query` split for `wasi:http`.
fn split_url(url: &str) -> Result<(bool, &str, &str), String> {
    let (https, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(format!("not an http(s) URL: {}", url_for_log(url)));
    };
    let cut = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(cut);
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("bad URL authority in {}", url_for_log(url)));
    }
    Ok((https, authority, if path.is_empty() { "/" } else { path }))
}

/// The URL without its query (presigned URLs carry signatures there).
pub fn url_for_log(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

/// Sends `method url` with `headers` and `body`; a transport failure (refused by the host,
/// connection error) is an `Err` with a message.
pub fn send(
    method: &str,
    url: &str,
    headers: &[(String, String)],
    body: Body<'_>,
) -> Result<Response, String> {
    let (https, authority, path) = split_url(url)?;
    let mut request = Request::to(method, https, authority.into(), path.into()).timeouts(TIMEOUTS);
    for (name, value) in headers {
        request = request.header(name, value.as_bytes());
    }
    let response = request.send(body).map_err(|e| e.into_message())?;
    let (status, headers) = (response.status(), response.headers());
    let body = response.bytes(MAX_RESPONSE).map_err(|e| e.into_message())?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_keeping_the_query() {
        let (s, a, p) = split_url("https://h.example:8443/up/x?sig=abc").unwrap();
        assert!(s);
        assert_eq!((a, p), ("h.example:8443", "/up/x?sig=abc"));
        let (s, a, p) = split_url("http://127.0.0.1:9").unwrap();
        assert!(!s);
        assert_eq!((a, p), ("127.0.0.1:9", "/"));
        assert!(split_url("ftp://h/x").is_err());
        assert!(split_url("http://u:p@h/x").is_err());
        assert_eq!(url_for_log("https://h/x?sig=secret"), "https://h/x");
    }
}
