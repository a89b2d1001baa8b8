//! The config of a plugin that reaches the network — a storage plugin's `--sync_config` key
//! `storage_config`, a publish plugin's `--publish_config` — split into what the host enforces
//! and what the plugin receives:
//!
//! - `allow_hosts`: the `host:port` authorities the plugin may reach through `wasi:http` (the
//!   host refuses any other; none given means no network at all). Removed before the plugin
//!   sees the config.
//! - `secrets`: an object of secret strings (passwords, tokens), each given inline or as
//!   `{"env": "VAR"}` (read from the host's environment, so it stays out of the command line).
//!   The plugin receives the values; the host never logs them: its copy of the config is
//!   redacted, and secret values are masked in everything the plugin says (log lines,
//!   stdout/stderr, error messages).
//! - every other key is the plugin's own (e.g. `base_url`, `username`); `{job_id}` in their
//!   strings becomes `KELPIE_JOB_ID`, as in storage URLs.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::storage::StorageError;

/// How errors name a storage plugin's config.
pub const STORAGE_CONFIG: &str = "--sync_config storage_config";

/// What secrets are replaced with wherever the host would print them.
pub const REDACTED: &str = "<redacted>";

/// A parsed network plugin config.
#[derive(Clone)]
pub struct NetPluginConfig {
    /// Lower-case `host:port` authorities the plugin may reach.
    pub allow_hosts: Vec<String>,
    /// JSON text passed to the plugin's `configure` (secrets resolved, `allow_hosts` removed).
    plugin_json: String,
    /// JSON text for logs (secret values replaced by [`REDACTED`]).
    redacted_json: String,
    /// Secret values, masked in anything the plugin says.
    secrets: Secrets,
}

impl std::fmt::Debug for NetPluginConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetPluginConfig")
            .field("allow_hosts", &self.allow_hosts)
            .field("config", &self.redacted_json)
            .finish()
    }
}

impl NetPluginConfig {
    /// Parses a storage plugin's `storage_config` (`None`: `{}`). Errors name the key and the fix.
    pub fn parse(value: Option<&Value>) -> Result<Self, StorageError> {
        Self::parse_flag(STORAGE_CONFIG, value)
    }

    /// Parses the config given as `flag` (the words errors start with, e.g. `--publish_config`).
    pub fn parse_flag(flag: &str, value: Option<&Value>) -> Result<Self, StorageError> {
        Self::parse_with_env(flag, value, |name| std::env::var(name).ok())
    }

    pub fn parse_with_env(
        flag: &str,
        value: Option<&Value>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, StorageError> {
        let bad = |msg: String| StorageError::Config(format!("{flag}{msg}"));
        let mut map: Map<String, Value> = match value {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(map)) => map.clone(),
            Some(_) => return Err(bad(": must be a JSON object".into())),
        };
        let allow_hosts = match map.remove("allow_hosts") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| match item.as_str() {
                    Some(text) => {
                        normalise_authority(text).map_err(|e| bad(format!(".allow_hosts: {e}")))
                    }
                    None => Err(bad(format!(
                        ".allow_hosts: {item} is not a string; write \"host:port\""
                    ))),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(bad(
                    ".allow_hosts: must be a list of \"host:port\" strings".into()
                ))
            }
        };
        let job_id = env("KELPIE_JOB_ID");
        for (name, value) in map.iter_mut().filter(|(name, _)| *name != "secrets") {
            expand_job_ids(value, job_id.as_deref()).map_err(|e| bad(format!(".{name}: {e}")))?;
        }
        let mut values = Vec::new();
        let mut redacted = map.clone();
        if let Some(secrets) = map.get_mut("secrets") {
            let Value::Object(secrets) = secrets else {
                return Err(bad(".secrets: must be an object of strings".into()));
            };
            let mut masked = Map::new();
            for (name, secret) in secrets.iter_mut() {
                let resolved = match secret {
                    Value::String(text) => text.clone(),
                    Value::Object(spec) if spec.len() == 1 && spec.contains_key("env") => {
                        let var = spec["env"].as_str().unwrap_or_default().to_string();
                        env(&var).filter(|v| !v.is_empty()).ok_or_else(|| {
                            bad(format!(
                                ".secrets.{name}: environment variable {var:?} is not set; \
                                 set it or give the secret inline"
                            ))
                        })?
                    }
                    _ => {
                        return Err(bad(format!(
                            ".secrets.{name}: must be a string or {{\"env\": \"VAR\"}}"
                        )))
                    }
                };
                *secret = Value::String(resolved.clone());
                masked.insert(name.clone(), Value::String(REDACTED.into()));
                values.push(resolved);
            }
            redacted.insert("secrets".into(), Value::Object(masked));
        }
        Ok(NetPluginConfig {
            allow_hosts,
            plugin_json: Value::Object(map).to_string(),
            redacted_json: Value::Object(redacted).to_string(),
            secrets: Secrets::new(values),
        })
    }

    /// The JSON text the plugin's `configure` receives (contains secrets: never log it).
    pub fn plugin_json(&self) -> &str {
        &self.plugin_json
    }

    /// The config with secret values replaced, for logs.
    pub fn redacted_json(&self) -> &str {
        &self.redacted_json
    }

    pub fn secrets(&self) -> &Secrets {
        &self.secrets
    }
}

/// Secret values to mask in text the host prints. Cheap to clone.
#[derive(Clone, Default)]
pub struct Secrets {
    values: Arc<[String]>,
}

impl Secrets {
    pub fn new(mut values: Vec<String>) -> Self {
        values.retain(|v| !v.is_empty());
        // Longest first, so a secret containing another is masked whole.
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values.dedup();
        Secrets {
            values: values.into(),
        }
    }

    /// `text` with every secret value replaced by [`REDACTED`].
    pub fn mask(&self, text: &str) -> String {
        let mut out = text.to_string();
        for secret in self.values.iter() {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), REDACTED);
            }
        }
        out
    }
}

/// Replaces `{job_id}` in every string of `value`.
fn expand_job_ids(value: &mut Value, job_id: Option<&str>) -> Result<(), StorageError> {
    match value {
        Value::String(text) => *text = crate::storage::expand_job_id(text, job_id)?,
        Value::Array(items) => {
            for item in items {
                expand_job_ids(item, job_id)?;
            }
        }
        Value::Object(map) => {
            for item in map.values_mut() {
                expand_job_ids(item, job_id)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// `Host:Port` → `host:port`; a port is required (the host cannot guess which one is meant).
fn normalise_authority(text: &str) -> Result<String, String> {
    let text = text.trim();
    let (host, port) = text
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty() && (!host.contains(':') || host.ends_with(']')))
        .ok_or_else(|| {
            format!("{text:?} needs a port, e.g. \"{text}:443\" (https) or \"{text}:80\" (http)")
        })?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{text:?}: {port:?} is not a port number"))?;
    if host.contains(['/', '@', ' ']) {
        return Err(format!(
            "{text:?} is not a host:port (no scheme, path or user info)"
        ));
    }
    Ok(format!("{}:{port}", host.to_ascii_lowercase()))
}

/// `--sync_config` text for `--dry_run` output: inline JSON with `storage_config.secrets`
/// values replaced by [`REDACTED`]; anything else (an `@file`, invalid JSON) unchanged.
pub fn redact_sync_config(text: &str) -> String {
    let Ok(Value::Object(mut map)) = serde_json::from_str::<Value>(text) else {
        return text.to_string();
    };
    let Some(storage) = map.get_mut("storage_config") else {
        return text.to_string();
    };
    redact_secrets(storage);
    Value::Object(map).to_string()
}

/// `--publish_config` text for `--dry_run` output: inline JSON with the `secrets` values
/// replaced by [`REDACTED`]; anything else unchanged.
pub fn redact_publish_config(text: &str) -> String {
    let Ok(mut config) = serde_json::from_str::<Value>(text) else {
        return text.to_string();
    };
    redact_secrets(&mut config);
    config.to_string()
}

fn redact_secrets(config: &mut Value) {
    if let Some(Value::Object(secrets)) = config.get_mut("secrets") {
        for value in secrets.values_mut() {
            *value = Value::String(REDACTED.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: Value) -> Result<NetPluginConfig, StorageError> {
        NetPluginConfig::parse_with_env(STORAGE_CONFIG, Some(&value), |name| match name {
            "DAV_PASSWORD" => Some("from-env-secret".to_string()),
            "KELPIE_JOB_ID" => Some("job-7".to_string()),
            _ => None,
        })
    }

    #[test]
    fn splits_allow_list_secrets_and_plugin_keys() {
        let config = parse(json!({
            "base_url": "http://127.0.0.1:8080/dav/{job_id}",
            "allow_hosts": ["LocalHost:8080", "[::1]:9000"],
            "secrets": {"password": "hunter2-secret", "token": {"env": "DAV_PASSWORD"}}
        }))
        .unwrap();
        assert_eq!(config.allow_hosts, ["localhost:8080", "[::1]:9000"]);
        let plugin: Value = serde_json::from_str(config.plugin_json()).unwrap();
        assert_eq!(plugin["secrets"]["password"], "hunter2-secret");
        assert_eq!(plugin["secrets"]["token"], "from-env-secret");
        assert!(plugin.get("allow_hosts").is_none());
        assert_eq!(plugin["base_url"], "http://127.0.0.1:8080/dav/job-7");
        let shown = config.redacted_json();
        assert!(
            !shown.contains("hunter2") && !shown.contains("from-env"),
            "{shown}"
        );
        assert!(shown.contains("base_url"), "{shown}");
        assert_eq!(
            config
                .secrets()
                .mask("auth hunter2-secret and from-env-secret!"),
            format!("auth {REDACTED} and {REDACTED}!")
        );
    }

    #[test]
    fn bad_entries_name_the_key() {
        for (value, needle) in [
            (
                json!({"allow_hosts": ["example.com"]}),
                "allow_hosts: \"example.com\" needs a port",
            ),
            (json!({"allow_hosts": ["h:99999"]}), "not a port number"),
            (json!({"allow_hosts": ["http://h:80"]}), "allow_hosts"),
            (json!({"allow_hosts": "h:1"}), "allow_hosts: must be a list"),
            (json!({"secrets": {"p": 5}}), "secrets.p: must be a string"),
            (
                json!({"secrets": {"p": {"env": "NOPE"}}}),
                "\"NOPE\" is not set",
            ),
            (json!([1]), "must be a JSON object"),
        ] {
            let err = parse(value.clone()).unwrap_err().to_string();
            assert!(
                err.contains("--sync_config storage_config"),
                "{value}: {err}"
            );
            assert!(err.contains(needle), "{value}: {err}");
        }
        assert!(NetPluginConfig::parse(None).unwrap().allow_hosts.is_empty());
    }

    #[test]
    fn dry_run_text_is_redacted() {
        let text = r#"{"storage":"x.wasm","storage_config":{"secrets":{"password":"pw-123456"}}}"#;
        let shown = redact_sync_config(text);
        assert!(
            !shown.contains("pw-123456") && shown.contains(REDACTED),
            "{shown}"
        );
        assert_eq!(redact_sync_config("@file.json"), "@file.json");
        let publish = redact_publish_config(r#"{"base_url":"u","secrets":{"token":"tk-98765"}}"#);
        assert!(
            !publish.contains("tk-98765") && publish.contains(REDACTED) && publish.contains("u"),
            "{publish}"
        );
    }
}
