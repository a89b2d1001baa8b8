//! A blocking HTTP client over `wasi:http` for publish plugins: one request, the whole response
//! (bodies of API answers are small), request bodies streamed from any [`Read`] so a multi-GB
//! upload never sits in plugin memory. The host decides which hosts a request may reach.

use std::io::Read;

use crate::publish_bindings::wasi::http::outgoing_handler;
use crate::publish_bindings::wasi::http::types::{
    ErrorCode, Fields, IncomingBody, IncomingResponse, Method, OutgoingBody, OutgoingRequest,
    RequestOptions, Scheme,
};
use crate::publish_bindings::wasi::io::streams::{OutputStream, StreamError};

/// Largest response body kept (API answers; uploads answer with a few bytes).
const MAX_RESPONSE: usize = 64 << 20;
const CHUNK: usize = 1 << 20;

/// A request body.
pub enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// Exactly `len` bytes from the reader.
    Stream(&'a mut dyn Read, u64),
}

/// A whole response.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// `scheme://authority/path?query` split for `wasi:http`.
fn split_url(url: &str) -> Result<(Scheme, &str, &str), String> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (Scheme::Https, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (Scheme::Http, rest)
    } else {
        return Err(format!("not an http(s) URL: {}", url_for_log(url)));
    };
    let cut = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(cut);
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("bad URL authority in {}", url_for_log(url)));
    }
    Ok((scheme, authority, if path.is_empty() { "/" } else { path }))
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
    let what = format!("{method} {}", url_for_log(url));
    let fail = |e: String| format!("{what}: {e}");
    let (scheme, authority, path) = split_url(url)?;
    let length = match &body {
        Body::Empty => None,
        Body::Bytes(b) => Some(b.len() as u64),
        Body::Stream(_, len) => Some(*len),
    };
    let mut fields: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone().into_bytes()))
        .collect();
    if let Some(length) = length {
        fields.push(("content-length".into(), length.to_string().into_bytes()));
    }
    let fields = Fields::from_list(&fields).map_err(|e| fail(format!("bad header: {e:?}")))?;
    let request = OutgoingRequest::new(fields);
    let method = match method {
        "GET" => Method::Get,
        "PUT" => Method::Put,
        "POST" => Method::Post,
        "DELETE" => Method::Delete,
        "HEAD" => Method::Head,
        other => Method::Other(other.to_string()),
    };
    let set = |ok: Result<(), ()>, part: &str| ok.map_err(|()| fail(format!("invalid {part}")));
    set(request.set_method(&method), "method")?;
    set(request.set_scheme(Some(&scheme)), "scheme")?;
    set(request.set_authority(Some(authority)), "authority")?;
    set(request.set_path_with_query(Some(path)), "path")?;
    let outgoing = match body {
        Body::Empty => None,
        _ => Some(
            request
                .body()
                .map_err(|()| fail("request body taken twice".into()))?,
        ),
    };
    let options = RequestOptions::new();
    let _ = options.set_connect_timeout(Some(30_000_000_000));
    let _ = options.set_first_byte_timeout(Some(300_000_000_000));
    let _ = options.set_between_bytes_timeout(Some(120_000_000_000));
    let pending =
        outgoing_handler::handle(request, Some(options)).map_err(|e| fail(error_code(e)))?;
    if let Some(outgoing) = outgoing {
        if let Err(e) = write_body(&outgoing, body) {
            drop(outgoing);
            // An early answer (e.g. 401 before the body) explains more than a broken pipe.
            return match wait(&pending) {
                Ok(response) if response.status() >= 400 => read_response(response, &what),
                _ => Err(fail(format!("{e} while sending the body"))),
            };
        }
        OutgoingBody::finish(outgoing, None).map_err(|e| fail(error_code(e)))?;
    }
    let response = wait(&pending).map_err(|e| fail(error_code(e)))?;
    read_response(response, &what)
}

fn error_code(e: ErrorCode) -> String {
    match e {
        ErrorCode::HttpRequestDenied => {
            "the host refused the request (not an allowed Hub or storage host)".into()
        }
        ErrorCode::ConnectionRefused => "connection refused".into(),
        other => format!("{other:?}"),
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
        Body::Stream(reader, len) => {
            let mut left = len;
            let mut buf = vec![0u8; CHUNK];
            while left > 0 {
                let want = (left as usize).min(CHUNK);
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
    Ok(())
}

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

fn read_response(response: IncomingResponse, what: &str) -> Result<Response, String> {
    let status = response.status();
    let headers = response
        .headers()
        .entries()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
        .collect();
    let body = response
        .consume()
        .map_err(|()| format!("{what}: response body taken twice"))?;
    let mut out = Vec::new();
    {
        let stream = body
            .stream()
            .map_err(|()| format!("{what}: response stream taken twice"))?;
        loop {
            match stream.blocking_read(CHUNK as u64) {
                Ok(chunk) => {
                    if out.len() + chunk.len() > MAX_RESPONSE {
                        return Err(format!("{what}: response larger than {MAX_RESPONSE} bytes"));
                    }
                    out.extend_from_slice(&chunk);
                }
                Err(StreamError::Closed) => break,
                Err(e) => return Err(format!("{what}: reading the response: {}", stream_error(e))),
            }
        }
    }
    drop(IncomingBody::finish(body));
    Ok(Response {
        status,
        headers,
        body: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_keeping_the_query() {
        let (s, a, p) = split_url("https://h.example:8443/up/x?sig=abc").unwrap();
        assert!(matches!(s, Scheme::Https));
        assert_eq!((a, p), ("h.example:8443", "/up/x?sig=abc"));
        let (_, a, p) = split_url("http://127.0.0.1:9").unwrap();
        assert_eq!((a, p), ("127.0.0.1:9", "/"));
        assert!(split_url("ftp://h/x").is_err());
        assert!(split_url("http://u:p@h/x").is_err());
        assert_eq!(url_for_log("https://h/x?sig=secret"), "https://h/x");
    }
}
