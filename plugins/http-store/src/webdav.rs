//! The WebDAV client behind [`Storage`].

use std::cell::RefCell;
use std::collections::HashSet;

use base64::Engine as _;
use ferrotune_plugin_sdk::storage::http::{decode_percent, Body, Request, Response, Url};
use ferrotune_plugin_sdk::storage::{BodyReader, BodyWriter, Error, ObjectInfo, Storage};
use serde::Deserialize;

use crate::propfind::{parse_http_date, parse_multistatus};

/// Largest PROPFIND response read (a listing of one collection).
const MAX_LISTING: usize = 64 << 20;
/// Largest error body quoted in a message.
const MAX_ERROR_BODY: usize = 64 << 10;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `http[s]://host[:port]/path`: the collection that holds the objects.
    pub base_url: String,
    /// Basic-auth user name (none: anonymous).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub secrets: Secrets,
}

/// Secret settings: the host hands them over but never logs them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Secrets {
    /// Basic-auth password.
    #[serde(default)]
    pub password: Option<String>,
}

pub struct WebDav {
    base: Url,
    /// `Basic …` header value, when credentials are configured.
    authorization: Option<String>,
    /// Collections known to exist (created or seen), so a put does not MKCOL them again.
    collections: RefCell<HashSet<String>>,
}

impl WebDav {
    fn request(&self, method: &str, url: Url) -> Request {
        let request = Request::new(method, url);
        match &self.authorization {
            Some(auth) => request.header("authorization", auth.as_bytes()),
            None => request,
        }
    }

    /// Maps statuses every call treats alike; `Ok` for the ones the caller handles.
    fn check(&self, response: Response, expected: &[u16]) -> Result<Response, Error> {
        let status = response.status();
        if expected.contains(&status) {
            return Ok(response);
        }
        let what = response.what().to_string();
        match status {
            401 | 403 => Err(Error::InvalidConfig(format!(
                "{what}: credentials rejected (HTTP {status}); check storage_config.username and \
                 storage_config.secrets.password"
            ))),
            404 => Err(Error::NotFound(format!("{what}: no such object"))),
            _ => {
                let body = response.bytes(MAX_ERROR_BODY).unwrap_or_default();
                let body = String::from_utf8_lossy(&body);
                let body = body.trim();
                let detail = if body.is_empty() || body.len() > 300 {
                    String::new()
                } else {
                    format!(": {body}")
                };
                let message = format!("{what}: HTTP {status}{detail}");
                // 4xx other than the above are settings or protocol problems; retrying won't help.
                if (400..500).contains(&status) && status != 408 && status != 429 {
                    Err(Error::InvalidConfig(format!(
                        "{message} (check storage_config.base_url)"
                    )))
                } else {
                    Err(Error::Other(message))
                }
            }
        }
    }

    /// Creates every missing collection above `key` (parents first; the base collection's own
    /// missing ancestors too).
    fn ensure_parents(&self, key: &str) -> Result<(), Error> {
        if !self.collections.borrow().contains("") {
            self.make_collection(&self.base, 0)?;
            self.collections.borrow_mut().insert(String::new());
        }
        let segments: Vec<&str> = key.split('/').collect();
        for depth in 1..segments.len() {
            let dir = segments[..depth].join("/");
            if self.collections.borrow().contains(&dir) {
                continue;
            }
            self.make_collection(&self.base.join(&dir), 0)?;
            self.collections.borrow_mut().insert(dir);
        }
        Ok(())
    }

    /// MKCOL `url`; on 409 (its parent is missing) creates the parent first, up to the root.
    fn make_collection(&self, url: &Url, depth: usize) -> Result<(), Error> {
        let mut dir = url.clone();
        dir.path.push('/');
        let response = self.request("MKCOL", dir).send(Body::Empty)?;
        match response.status() {
            // 201: created; 405: it already exists (RFC 4918 §9.3.1).
            201 | 200 | 405 => Ok(()),
            409 if depth < 64 && url.path.contains('/') => {
                let (parent, _) = url.path.rsplit_once('/').expect("checked above");
                let parent = Url {
                    path: parent.to_string(),
                    ..url.clone()
                };
                if parent.path.is_empty() {
                    return self.check(response, &[]).map(|_| ());
                }
                self.make_collection(&parent, depth + 1)?;
                let mut dir = url.clone();
                dir.path.push('/');
                let retry = self.request("MKCOL", dir).send(Body::Empty)?;
                self.check(retry, &[200, 201, 405]).map(|_| ())
            }
            _ => self.check(response, &[]).map(|_| ()),
        }
    }

    fn info_from(&self, key: &str, response: &Response, size: u64) -> ObjectInfo {
        ObjectInfo {
            key: key.to_string(),
            size,
            modified_ms: response
                .header("last-modified")
                .and_then(|d| parse_http_date(&d)),
            etag: response.header("etag"),
        }
    }

    /// The key of a PROPFIND href relative to the base collection (`None`: outside it).
    fn key_of(&self, href: &str) -> Option<String> {
        let path = match href.split_once("://") {
            Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
            None => href,
        };
        let path = decode_percent(path);
        let base = decode_percent(&self.base.path);
        let rel = path.strip_prefix(&base)?;
        if !(rel.is_empty() || rel.starts_with('/')) {
            return None;
        }
        Some(rel.trim_matches('/').to_string())
    }

    /// Lists collection `dir` ("" = the base) and recurses where keys can match `prefix`.
    fn walk(&self, dir: &str, prefix: &str, out: &mut Vec<ObjectInfo>) -> Result<(), Error> {
        let mut url = self.base.join(dir);
        url.path.push('/');
        // No body: an empty PROPFIND is `allprop` (RFC 4918 §9.1), which every server answers
        // with the four properties read here.
        let response = self
            .request("PROPFIND", url)
            .header("depth", "1")
            .send(Body::Empty)?;
        if response.status() == 404 {
            return Ok(());
        }
        let response = self.check(response, &[207])?;
        let what = response.what().to_string();
        let xml = response.bytes(MAX_LISTING)?;
        let xml = String::from_utf8(xml)
            .map_err(|_| Error::Other(format!("{what}: listing is not UTF-8")))?;
        let entries = parse_multistatus(&xml).map_err(|e| Error::Other(format!("{what}: {e}")))?;
        for entry in entries {
            let Some(key) = self.key_of(&entry.href) else {
                continue;
            };
            if key == dir || key.is_empty() {
                continue; // the collection itself
            }
            if entry.collection {
                self.collections.borrow_mut().insert(key.clone());
                let as_dir = format!("{key}/");
                if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                    self.walk(&key, prefix, out)?;
                }
            } else if key.starts_with(prefix) {
                out.push(ObjectInfo {
                    key,
                    size: entry.size.unwrap_or(0),
                    modified_ms: entry.modified_ms,
                    etag: entry.etag,
                });
            }
        }
        Ok(())
    }
}

impl Storage for WebDav {
    const NAME: &'static str = "http-store";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "a WebDAV server as an object store (PUT/GET/HEAD/DELETE, MKCOL, PROPFIND), basic auth";
    const CONFIG_SCHEMA: Option<&'static str> = Some(
        r#"{"type":"object","additionalProperties":false,"required":["base_url"],"properties":{"base_url":{"type":"string"},"username":{"type":"string"},"secrets":{"type":"object","properties":{"password":{"type":"string"}}}}}"#,
    );

    type Config = Config;

    fn new(config: Config) -> Result<Self, Error> {
        let base = Url::parse(&config.base_url)
            .map_err(|e| Error::InvalidConfig(format!("storage_config.base_url: {e}")))?;
        let authorization = match (config.username, config.secrets.password) {
            (Some(user), password) => {
                let pair = format!("{user}:{}", password.unwrap_or_default());
                Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                ))
            }
            (None, Some(_)) => {
                return Err(Error::InvalidConfig(
                    "storage_config.secrets.password is set but storage_config.username is not"
                        .into(),
                ))
            }
            (None, None) => None,
        };
        Ok(WebDav {
            base,
            authorization,
            collections: RefCell::new(HashSet::new()),
        })
    }

    fn put(&self, key: &str, body: &BodyReader) -> Result<ObjectInfo, Error> {
        self.ensure_parents(key)?;
        let response = self
            .request("PUT", self.base.join(key))
            .header("content-type", "application/octet-stream")
            .send(Body::File(body))?;
        self.check(response, &[200, 201, 204])?;
        // What the server stores now (size, etag), for the host's check.
        self.head(key)?.ok_or_else(|| {
            Error::Other(format!(
                "{}: missing right after a successful PUT",
                self.base.join(key)
            ))
        })
    }

    fn get(&self, key: &str, body: &BodyWriter) -> Result<ObjectInfo, Error> {
        let response = self.request("GET", self.base.join(key)).send(Body::Empty)?;
        let response = self.check(response, &[200])?;
        let expected = response
            .header("content-length")
            .and_then(|n| n.parse::<u64>().ok());
        let mut info = self.info_from(key, &response, 0);
        let what = response.what().to_string();
        info.size = response.copy_to(body)?;
        if let Some(expected) = expected.filter(|n| *n != info.size) {
            return Err(Error::Other(format!(
                "{what}: got {} of {expected} bytes",
                info.size
            )));
        }
        Ok(info)
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, Error> {
        let dir = prefix.rsplit_once('/').map_or("", |(dir, _)| dir);
        let mut out = Vec::new();
        self.walk(dir, prefix, &mut out)?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), Error> {
        let response = self
            .request("DELETE", self.base.join(key))
            .send(Body::Empty)?;
        if response.status() == 404 {
            return Ok(());
        }
        self.check(response, &[200, 204])?;
        Ok(())
    }

    /// PROPFIND `Depth: 0` rather than HEAD: the same properties as listings, and some servers
    /// (wsgidav among them) send a body with a HEAD 404, which breaks HTTP framing.
    fn head(&self, key: &str) -> Result<Option<ObjectInfo>, Error> {
        let response = self
            .request("PROPFIND", self.base.join(key))
            .header("depth", "0")
            .send(Body::Empty)?;
        if response.status() == 404 {
            return Ok(None);
        }
        let response = self.check(response, &[207])?;
        let what = response.what().to_string();
        let xml = response.bytes(MAX_ERROR_BODY)?;
        let entries = parse_multistatus(&String::from_utf8_lossy(&xml))
            .map_err(|e| Error::Other(format!("{what}: {e}")))?;
        let Some(entry) = entries.into_iter().next() else {
            return Err(Error::Other(format!("{what}: empty multistatus")));
        };
        if entry.collection {
            return Ok(None); // a directory, not an object
        }
        let size = entry
            .size
            .ok_or_else(|| Error::Other(format!("{what}: no getcontentlength")))?;
        Ok(Some(ObjectInfo {
            key: key.to_string(),
            size,
            modified_ms: entry.modified_ms,
            etag: entry.etag,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(base: &str) -> WebDav {
        WebDav::new(Config {
            base_url: base.into(),
            username: Some("u".into()),
            secrets: Secrets {
                password: Some("p".into()),
            },
        })
        .unwrap()
    }

    #[test]
    fn hrefs_map_to_keys_under_the_base_only() {
        let dav = store("http://h:1/dav");
        assert_eq!(dav.key_of("/dav/a/b%20c.bin").as_deref(), Some("a/b c.bin"));
        assert_eq!(dav.key_of("http://h:1/dav/a/").as_deref(), Some("a"));
        assert_eq!(dav.key_of("/dav/").as_deref(), Some(""));
        assert_eq!(dav.key_of("/davx/a"), None);
        assert_eq!(dav.key_of("/other/a"), None);
        assert_eq!(store("http://h:1").key_of("/a/b").as_deref(), Some("a/b"));
    }

    #[test]
    fn config_errors_name_the_key() {
        let err = WebDav::new(Config {
            base_url: "ftp://x".into(),
            username: None,
            secrets: Secrets::default(),
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("storage_config.base_url"), "{err}");
        let err = WebDav::new(Config {
            base_url: "http://x".into(),
            username: None,
            secrets: Secrets {
                password: Some("p".into()),
            },
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("storage_config.username"), "{err}");
        assert!(store("http://x").authorization.as_deref() == Some("Basic dTpw"));
    }
}
