//! The network grant of a plugin that imports `wasi:http`: outgoing requests may reach only the
//! `host:port` authorities the job allows; any other is refused before a connection is made
//! (the guest sees `http-request-denied`) and recorded, so the host can report it in its own
//! words whatever the plugin makes of the error. Connect and between-bytes timeouts the
//! plugin leaves unset default to the per-call deadline, so a silent server cannot hang a call
//! forever.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use wasmtime_wasi_http::{RequestOptions, WasiHttpHooks};

/// Allow-list hooks for `wasmtime-wasi-http`.
pub struct NetGrant {
    plugin: Arc<str>,
    allow: Arc<[String]>,
    timeout: Duration,
    /// Also allow any authority reached with this scheme (see [`NetGrant::any_host_over`]).
    any_over: Option<&'static str>,
    /// Authorities refused since the last [`NetGrant::take_denied`].
    denied: Arc<Mutex<Vec<String>>>,
}

impl NetGrant {
    /// `allow`: lower-case `host:port` entries.
    pub fn new(plugin: Arc<str>, allow: Vec<String>, timeout: Duration) -> Self {
        NetGrant {
            plugin,
            allow: allow.into(),
            timeout,
            any_over: None,
            denied: Arc::default(),
        }
    }

    /// Also allows every host reached over `scheme` ("https"): for a publish plugin, whose Hub
    /// hands out upload URLs on storage hosts it names only at run time. Each such request is
    /// logged at info level.
    pub fn any_host_over(mut self, scheme: &'static str) -> Self {
        self.any_over = Some(scheme);
        self
    }

    /// The allowed authorities, for messages.
    pub fn allowed(&self) -> &[String] {
        &self.allow
    }

    /// Authorities refused since the last call, oldest first.
    pub fn take_denied(&self) -> Vec<String> {
        std::mem::take(&mut *self.denied.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// `host:port` of `uri`, lower case, with the scheme's default port when none is written.
    fn authority_of(uri: &http::Uri) -> Option<String> {
        let host = uri.host()?.to_ascii_lowercase();
        let port = uri.port_u16().or_else(|| match uri.scheme_str() {
            Some("https") => Some(443),
            Some("http") => Some(80),
            _ => None,
        })?;
        Some(format!("{host}:{port}"))
    }

    fn allows(&self, authority: &str) -> bool {
        self.allow.iter().any(|a| a == authority)
    }

    /// Whether [`NetGrant::any_host_over`] lets `uri` through (a host, over that scheme).
    fn allows_by_scheme(&self, uri: &http::Uri) -> bool {
        self.any_over.is_some()
            && uri.scheme_str() == self.any_over
            && Self::authority_of(uri).is_some()
    }
}

impl WasiHttpHooks for NetGrant {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        http::Response<wasmtime_wasi_http::WasiBody>,
                        Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        let authority = Self::authority_of(request.uri());
        let listed = authority.as_deref().is_some_and(|a| self.allows(a));
        let by_scheme = !listed && self.allows_by_scheme(request.uri());
        if by_scheme {
            tracing::info!(
                plugin = %self.plugin,
                "plugin upload to {} (allowed: any {} host)",
                authority.as_deref().unwrap_or_default(),
                self.any_over.unwrap_or_default()
            );
        }
        let allowed = listed || by_scheme;
        if !allowed {
            let authority = authority.unwrap_or_else(|| request.uri().to_string());
            tracing::warn!(
                plugin = %self.plugin,
                "refused a request to {authority}: not in storage_config.allow_hosts ({})",
                if self.allow.is_empty() { "empty".to_string() } else { self.allow.join(", ") }
            );
            self.denied
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(authority);
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        tracing::debug!(
            plugin = %self.plugin,
            method = %request.method(),
            authority = authority.as_deref().unwrap_or_default(),
            path = request.uri().path(),
            "plugin http request"
        );
        // Connecting and each wait between response bytes default to the per-call deadline.
        // Not the first byte: it comes only after the whole request body is sent, which for a
        // large upload takes as long as it takes (wasmtime's default, 10 min, applies).
        let mut options = options.unwrap_or_default();
        options.connect_timeout.get_or_insert(self.timeout);
        options.between_bytes_timeout.get_or_insert(self.timeout);
        Box::new(async move {
            let (response, io) =
                wasmtime_wasi_http::default_send_request(request, Some(options)).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_get_default_ports_and_lower_case() {
        let of = |u: &str| NetGrant::authority_of(&u.parse().unwrap());
        assert_eq!(
            of("http://Example.com/x").as_deref(),
            Some("example.com:80")
        );
        assert_eq!(of("https://h/x").as_deref(), Some("h:443"));
        assert_eq!(
            of("http://127.0.0.1:8080/").as_deref(),
            Some("127.0.0.1:8080")
        );
        assert_eq!(of("/relative"), None);
        let grant = NetGrant::new("p".into(), vec!["h:443".into()], Duration::from_secs(1));
        assert!(grant.allows("h:443"));
        assert!(!grant.allows("h:80"));
        assert!(!grant.allows("evil:443"));
        let uri = |u: &str| u.parse::<http::Uri>().unwrap();
        assert!(!grant.allows_by_scheme(&uri("https://storage.example/x")));
        let publish = NetGrant::new("p".into(), vec!["hub:443".into()], Duration::from_secs(1))
            .any_host_over("https");
        assert!(publish.allows_by_scheme(&uri("https://s3.example/bucket?sig=1")));
        assert!(!publish.allows_by_scheme(&uri("http://s3.example/bucket")));
        assert!(!publish.allows_by_scheme(&uri("/relative")));
    }
}
