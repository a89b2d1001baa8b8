//! The `publish`-world plugin: [`hub::Hub`] over `wasi:http`, files through the host's
//! `open-artefact`. The host passes the endpoint, token and repository in the config; the token
//! is used for requests to the endpoint's origin only and never written to the log.

use std::io::Read;

use ferrotune_plugin_sdk::publish::{self, http, Artefact, PluginError, Publisher};
use serde::Deserialize;

use crate::hub::{self, Body, FileSource, Hub, HubError, Request, Response, Transport, UploadFile};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The Hub's base URL (`https://huggingface.co` or `HF_ENDPOINT`).
    endpoint: String,
    token: String,
    /// `owner/name`.
    repo_id: String,
    #[serde(default)]
    private: bool,
    #[serde(default = "default_revision")]
    revision: String,
    #[serde(default = "default_message")]
    message: String,
}

fn default_revision() -> String {
    "main".into()
}

fn default_message() -> String {
    "Upload with ferrotune".into()
}

pub struct HfPublish {
    config: Config,
}

/// `hub::Transport` over the SDK's `wasi:http` client.
struct WasiHttp;

impl Transport for WasiHttp {
    fn send(&mut self, request: Request<'_>) -> Result<Response, String> {
        let body = match request.body {
            Body::Empty => http::Body::Empty,
            Body::Bytes(ref b) => http::Body::Bytes(b),
            Body::Stream(reader, len) => http::Body::Stream(reader, len),
        };
        let r = http::send(request.method, &request.url, &request.headers, body)?;
        Ok(Response {
            status: r.status,
            headers: r.headers,
            body: r.body,
        })
    }
}

/// Files through the host: the plugin never sees the file system.
struct HostFiles;

impl FileSource for HostFiles {
    fn open(&mut self, path: &str) -> std::io::Result<Box<dyn Read + '_>> {
        publish::open_artefact(path)
            .map(|r| Box::new(r) as Box<dyn Read>)
            .map_err(|e| std::io::Error::other(publish::error_text(&e)))
    }
}

/// The commit's files: each artefact file at its path relative to the artefact's directory.
pub fn upload_files(artefacts: &[Artefact]) -> Vec<UploadFile> {
    artefacts
        .iter()
        .flat_map(|a| {
            a.files.iter().map(|f| UploadFile {
                local: format!("{}/{}", a.path.trim_end_matches('/'), f.path),
                path_in_repo: f.path.clone(),
            })
        })
        .collect()
}

fn to_plugin_error(e: HubError) -> PluginError {
    match e {
        HubError::Auth(m) => PluginError::InvalidConfig(m),
        HubError::Unreachable(m) if m.contains("the host refused") => PluginError::Denied(m),
        HubError::Unreachable(m) | HubError::Io(m) | HubError::Hub(m) => PluginError::Other(m),
    }
}

impl Publisher for HfPublish {
    const NAME: &'static str = "hf-hub";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "pushes the run's artefacts to a Hugging Face-compatible Hub in one commit (LFS for large files)";
    type Config = Config;

    fn new(config: Config) -> Result<Self, PluginError> {
        hub::check_repo_id(&config.repo_id).map_err(PluginError::InvalidConfig)?;
        if !config.endpoint.starts_with("https://") && !config.endpoint.starts_with("http://") {
            return Err(PluginError::InvalidConfig(format!(
                "endpoint {:?} is not an http(s) URL",
                config.endpoint
            )));
        }
        Ok(HfPublish { config })
    }

    fn publish(&self, artefacts: &[Artefact]) -> Result<Vec<String>, PluginError> {
        let c = &self.config;
        let files = upload_files(artefacts);
        let mut hub = Hub::new(&c.endpoint, &c.token, WasiHttp);
        hub.create_repo(&c.repo_id, c.private)
            .map_err(to_plugin_error)?;
        let commit = hub
            .upload(&c.repo_id, &c.revision, &files, &mut HostFiles, &c.message)
            .map_err(to_plugin_error)?;
        publish::log(&format!(
            "committed {} file(s) to {} ({})",
            files.len(),
            c.repo_id,
            commit.commit_oid
        ));
        Ok(vec![if commit.commit_url.is_empty() {
            format!("{}/{}", c.endpoint.trim_end_matches('/'), c.repo_id)
        } else {
            commit.commit_url
        }])
    }
}

ferrotune_plugin_sdk::export_publisher!(HfPublish);
