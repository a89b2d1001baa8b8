//! The Kelpie API client: `POST /jobs`, `GET /jobs/:id`, `DELETE /jobs/:id`, authenticated by the
//! `Salad-Api-Key`, `Salad-Organization` and `Salad-Project` headers.

use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

use super::args::ApiArgs;
use crate::cli::UsageError;

/// Where the API is unless `KELPIE_API_URL` says otherwise.
pub const DEFAULT_API_URL: &str = "https://kelpie.saladexamples.com";

pub struct Api {
    base: String,
    key: String,
    organization: String,
    project: String,
    agent: ureq::Agent,
}

impl Api {
    /// The API the environment (and flags) name; a missing credential is bad input (exit 2).
    pub fn from_env(args: &ApiArgs) -> Result<Self, UsageError> {
        let key = non_empty_env("SALAD_API_KEY").ok_or_else(|| {
            UsageError::new(
                "SALAD_API_KEY is not set: export your SaladCloud API key as SALAD_API_KEY",
            )
        })?;
        let organization = named(&args.organization, "--organization", "SALAD_ORGANIZATION")?;
        let project = named(&args.project, "--project", "SALAD_PROJECT")?;
        let base = non_empty_env("KELPIE_API_URL").unwrap_or_else(|| DEFAULT_API_URL.to_string());
        let config = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_global(Some(Duration::from_secs(60)))
            // Error statuses are read here so that the server's message can be shown.
            .http_status_as_error(false)
            .user_agent(concat!("ferrotune/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            key,
            organization,
            project,
            agent: config.into(),
        })
    }

    /// Queues `job`; returns the created job (with its `id`).
    pub fn submit(&self, job: &Value) -> anyhow::Result<Option<Value>> {
        let url = format!("{}/jobs", self.base);
        let request = self
            .authorised(self.agent.post(&url))
            .header("Content-Type", "application/json");
        self.answer("POST", &url, request.send(job.to_string()))
    }

    pub fn status(&self, id: &str) -> anyhow::Result<Option<Value>> {
        let url = self.job_url(id)?;
        self.answer("GET", &url, self.authorised(self.agent.get(&url)).call())
    }

    pub fn cancel(&self, id: &str) -> anyhow::Result<Option<Value>> {
        let url = self.job_url(id)?;
        self.answer(
            "DELETE",
            &url,
            self.authorised(self.agent.delete(&url)).call(),
        )
    }

    fn job_url(&self, id: &str) -> anyhow::Result<String> {
        // An id is one path segment; anything else would address another endpoint.
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            return Err(UsageError::new(format!(
                "job id {id:?}: expected the id `ferrotune kelpie submit` printed (letters, digits, - and _)"
            ))
            .into());
        }
        Ok(format!("{}/jobs/{id}", self.base))
    }

    fn authorised<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        request
            .header("Salad-Api-Key", &self.key)
            .header("Salad-Organization", &self.organization)
            .header("Salad-Project", &self.project)
    }

    /// The answer's JSON (`None` for an empty body), or one line with the status and the server's
    /// message. The key is masked in anything shown, in case a server echoes it.
    fn answer(
        &self,
        method: &str,
        url: &str,
        sent: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<Option<Value>> {
        let mut response = sent
            .map_err(|e| anyhow::anyhow!(self.mask(&e.to_string())))
            .with_context(|| {
                format!("{method} {url}: cannot reach the Kelpie API (KELPIE_API_URL)")
            })?;
        let status = response.status();
        let text = response
            .body_mut()
            .read_to_string()
            .with_context(|| format!("{method} {url}: reading the answer"))?;
        if !status.is_success() {
            let hint = match status.as_u16() {
                401 | 403 => " (check SALAD_API_KEY, SALAD_ORGANIZATION and SALAD_PROJECT)",
                _ => "",
            };
            bail!(
                "{method} {url}: HTTP {status}: {}{hint}",
                self.mask(&server_message(&text))
            );
        }
        if text.trim().is_empty() {
            return Ok(None);
        }
        let value = serde_json::from_str(&text).with_context(|| {
            format!(
                "{method} {url}: the answer is not JSON: {}",
                self.mask(&clip(&text))
            )
        })?;
        Ok(Some(value))
    }

    fn mask(&self, text: &str) -> String {
        text.replace(&self.key, "<SALAD_API_KEY>")
    }
}

/// The server's own words: `message` or `error` of a JSON body, else the body itself (clipped).
fn server_message(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let field = parsed.as_ref().and_then(|v| {
        ["message", "error", "detail"]
            .iter()
            .find_map(|k| v.get(*k))
            .map(|m| m.as_str().map_or_else(|| m.to_string(), str::to_string))
    });
    match field {
        Some(message) => clip(&message),
        None if body.trim().is_empty() => "(empty answer)".to_string(),
        None => clip(body),
    }
}

/// One line, at most 300 characters.
fn clip(text: &str) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(300) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line,
    }
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn named(flag: &Option<String>, flag_name: &str, var: &str) -> Result<String, UsageError> {
    flag.clone()
        .filter(|v| !v.trim().is_empty())
        .or_else(|| non_empty_env(var))
        .ok_or_else(|| UsageError::new(format!("{var} is not set: export it or pass {flag_name}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_servers_message_is_taken_from_json_or_the_body() {
        assert_eq!(
            server_message(r#"{"error":"Unauthorized"}"#),
            "Unauthorized"
        );
        assert_eq!(server_message("not\n found"), "not found");
        assert_eq!(server_message(""), "(empty answer)");
    }
}
