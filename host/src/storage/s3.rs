//! `s3://bucket/prefix` through aws-sdk-s3: AWS S3 and S3-compatible stores (Cloudflare R2,
//! MinIO, ...) selected with `AWS_ENDPOINT_URL`.
//!
//! Settings come from the variables Kelpie passes to jobs (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, optional `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL[_S3]`)
//! and nothing else: no profile files and no instance-metadata probing, so a missing variable is
//! an error that names it rather than a minute of timeouts.
//!
//! Integrity: every upload request carries `Content-MD5` (checked by the server: a body damaged
//! in transit is rejected), the whole file's SHA-256 is stored as object metadata, and a
//! download is hashed while it streams and compared with it. Uploads are re-checked with a
//! HEAD (size and SHA-256) before they count as done.
//!
//! Retries: the SDK's standard retry strategy (exponential backoff with full jitter on
//! throttling, 5xx, timeouts and connection errors); what still fails is reported as
//! [`StorageError::Transient`] so that sync can keep trying.

use std::fmt;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use base64::Engine as _;
use md5::{Digest as _, Md5};
use sha2::Sha256;

use super::transfer::{local_size, Partial};
use super::{key, ObjectInfo, ObjectStore, StorageError};

/// Default part size: files up to this size go up in one PUT; larger ones as multipart uploads
/// of parts this size (raised when a file would need more than S3's 10,000 parts).
pub const PART_SIZE: u64 = 32 * 1024 * 1024;
const MAX_PARTS: u64 = 10_000;
/// Parts uploaded at once per file.
const PART_CONCURRENCY: usize = 4;
/// Object metadata key (`x-amz-meta-sha256`) holding the hex SHA-256 of the whole file.
const SHA256_META: &str = "sha256";

/// Connection settings read from the environment. `Debug` never shows the secrets.
#[derive(Clone)]
pub struct S3Settings {
    pub region: String,
    /// Custom endpoint (R2, MinIO, a local test server); selects path-style addressing.
    pub endpoint: Option<String>,
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
    /// Attempts per request, including the first (the SDK backs off between them).
    pub max_attempts: u32,
    /// Multipart part size (S3 needs >= 5 MiB for all parts but the last); files up to this
    /// size go up in one PUT.
    pub part_size: u64,
}

impl fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Settings")
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("access_key_id", &"<redacted>")
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .field("max_attempts", &self.max_attempts)
            .field("part_size", &self.part_size)
            .finish()
    }
}

impl S3Settings {
    pub fn from_env() -> Result<Self, StorageError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the settings through `var` (the environment, or a map in tests).
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self, StorageError> {
        let get = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let missing = |name: &str, fix: &str| {
            StorageError::Config(format!("s3 storage: {name} is not set; {fix}"))
        };
        let access_key_id = get("AWS_ACCESS_KEY_ID")
            .ok_or_else(|| missing("AWS_ACCESS_KEY_ID", "set it to the access key id"))?;
        let secret_access_key = get("AWS_SECRET_ACCESS_KEY").ok_or_else(|| {
            missing(
                "AWS_SECRET_ACCESS_KEY",
                "set it to the secret of AWS_ACCESS_KEY_ID",
            )
        })?;
        let region = get("AWS_REGION")
            .or_else(|| get("AWS_DEFAULT_REGION"))
            .ok_or_else(|| {
                missing(
                    "AWS_REGION",
                    "set it to the bucket's region (Cloudflare R2: auto, MinIO: us-east-1)",
                )
            })?;
        let endpoint = get("AWS_ENDPOINT_URL_S3").or_else(|| get("AWS_ENDPOINT_URL"));
        if let Some(url) = &endpoint {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(StorageError::Config(format!(
                    "s3 storage: AWS_ENDPOINT_URL {url:?} is not an http(s) URL; \
                     e.g. https://ACCOUNT.r2.cloudflarestorage.com"
                )));
            }
        }
        Ok(S3Settings {
            region,
            endpoint,
            access_key_id,
            secret_access_key,
            session_token: get("AWS_SESSION_TOKEN"),
            max_attempts: 5,
            part_size: PART_SIZE,
        })
    }
}

/// A bucket (and key prefix) in an S3-compatible store.
pub struct S3Store {
    client: Client,
    bucket: String,
    /// Key prefix without a trailing `/` ("" for the whole bucket).
    prefix: String,
    url: String,
    /// Where requests go, for messages ("AWS S3" or the custom endpoint).
    endpoint: String,
    part_size: u64,
    /// The SDK is async; this store blocks its callers on a small private runtime.
    runtime: tokio::runtime::Runtime,
}

impl S3Store {
    /// Builds the client. No request is made until the first call.
    pub fn connect(bucket: &str, prefix: &str, settings: S3Settings) -> Result<Self, StorageError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ferrotune-s3")
            .enable_all()
            .build()
            .map_err(|e| {
                StorageError::Config(format!("s3 storage: cannot start I/O runtime: {e}"))
            })?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let credentials = Credentials::new(
            settings.access_key_id.clone(),
            settings.secret_access_key.clone(),
            settings.session_token.clone(),
            None,
            "environment",
        );
        let mut config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()))
            .credentials_provider(credentials)
            .http_client(http)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(settings.max_attempts)
                    .with_initial_backoff(Duration::from_millis(200))
                    .with_max_backoff(Duration::from_secs(20)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .read_timeout(Duration::from_secs(60))
                    .operation_attempt_timeout(Duration::from_secs(600))
                    .build(),
            )
            // Content-MD5 (below) is the integrity check every S3-compatible store supports;
            // the SDK's default CRC trailers are not understood by all of them.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .stalled_stream_protection(StalledStreamProtectionConfig::enabled().build());
        if let Some(endpoint) = &settings.endpoint {
            config = config.endpoint_url(endpoint).force_path_style(true);
        }
        let prefix = prefix.trim_matches('/').to_string();
        Ok(S3Store {
            client: Client::from_conf(config.build()),
            url: format!("s3://{}/{}", bucket, prefix)
                .trim_end_matches('/')
                .to_string(),
            bucket: bucket.to_string(),
            prefix,
            endpoint: settings.endpoint.unwrap_or_else(|| "AWS S3".to_string()),
            part_size: settings.part_size.max(1),
            runtime,
        })
    }

    fn full_key(&self, key: &str) -> Result<String, StorageError> {
        key::check(key)?;
        Ok(key::join(&[&self.prefix, key]))
    }

    fn relative_key<'a>(&self, full: &'a str) -> &'a str {
        if self.prefix.is_empty() {
            full
        } else {
            full.strip_prefix(&self.prefix)
                .and_then(|k| k.strip_prefix('/'))
                .unwrap_or(full)
        }
    }

    /// Turns an SDK error into a message that says what to fix.
    fn classify<E>(&self, op: &str, key: &str, err: SdkError<E, HttpResponse>) -> StorageError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let what = format!("{op} {}/{key}", self.url);
        let status = err.raw_response().map(|r| r.status().as_u16());
        match &err {
            SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
                return StorageError::Transient(format!(
                    "{what}: cannot reach {} ({}); check AWS_ENDPOINT_URL and the network",
                    self.endpoint,
                    DisplayErrorContext(&err)
                ))
            }
            SdkError::ConstructionFailure(_) => {
                return StorageError::Config(format!("{what}: {}", DisplayErrorContext(&err)))
            }
            _ => {}
        }
        let code = err.code().unwrap_or("").to_string();
        let detail = format!(
            "{} (HTTP {})",
            if code.is_empty() { "error" } else { &code },
            status.map_or("?".to_string(), |s| s.to_string())
        );
        match code.as_str() {
            "NoSuchBucket" => StorageError::Config(format!(
                "{what}: bucket {:?} does not exist at {}; create it or fix the bucket in the URL",
                self.bucket, self.endpoint
            )),
            "NoSuchKey" | "NotFound" => StorageError::NotFound(format!("{what}: no such object")),
            "InvalidAccessKeyId"
            | "SignatureDoesNotMatch"
            | "InvalidToken"
            | "ExpiredToken"
            | "AccessDenied"
            | "Forbidden" => StorageError::Config(format!(
                "{what}: credentials rejected: {detail}; check AWS_ACCESS_KEY_ID, \
                 AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) and the key's permissions"
            )),
            "AuthorizationHeaderMalformed"
            | "PermanentRedirect"
            | "IllegalLocationConstraintException" => StorageError::Config(format!(
                "{what}: {detail}; the bucket lives in another region: fix AWS_REGION"
            )),
            _ => match status {
                Some(404) => StorageError::NotFound(format!("{what}: no such object")),
                Some(401 | 403) => StorageError::Config(format!(
                    "{what}: credentials rejected: {detail}; check AWS_ACCESS_KEY_ID and \
                     AWS_SECRET_ACCESS_KEY"
                )),
                Some(s) if (400..500).contains(&s) && s != 408 && s != 429 => {
                    StorageError::Config(format!("{what}: rejected: {}", DisplayErrorContext(&err)))
                }
                _ => StorageError::Transient(format!(
                    "{what}: {detail}, still failing after retries: {}",
                    DisplayErrorContext(&err)
                )),
            },
        }
    }

    async fn put_single(
        &self,
        full: &str,
        key: &str,
        src: &Path,
        size: u64,
        sha256: &str,
    ) -> Result<(), StorageError> {
        let md5 = md5_of(src, 0, size)?;
        let body = ByteStream::read_from()
            .path(src)
            .length(Length::Exact(size))
            .build()
            .await
            .map_err(|e| StorageError::local("cannot read", src, std::io::Error::other(e)))?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(full)
            .body(body)
            .content_length(size as i64)
            .content_md5(base64_md5(&md5))
            .metadata(SHA256_META, sha256)
            .send()
            .await
            .map_err(|e| self.classify("upload", key, e))?;
        Ok(())
    }

    async fn put_multipart(
        &self,
        full: &str,
        key: &str,
        src: &Path,
        size: u64,
        sha256: &str,
    ) -> Result<(), StorageError> {
        let part_size = self.part_size.max(size.div_ceil(MAX_PARTS));
        let parts = size.div_ceil(part_size);
        let upload = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .metadata(SHA256_META, sha256)
            .send()
            .await
            .map_err(|e| self.classify("start multipart upload", key, e))?;
        let upload_id = upload.upload_id().unwrap_or_default().to_string();
        let result = self
            .upload_parts(full, key, src, size, part_size, parts, &upload_id)
            .await;
        let completed = match result {
            Ok(completed) => completed,
            Err(err) => {
                // Leave no orphaned parts behind (they would be billed forever).
                let _ = self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(full)
                    .upload_id(&upload_id)
                    .send()
                    .await;
                return Err(err);
            }
        };
        let answer = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .upload_id(&upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(completed))
                    .build(),
            )
            .send()
            .await;
        match answer {
            Ok(_) => {}
            // Some S3-compatible servers answer 200 with a body the SDK cannot parse (moto names
            // the root element CompleteMultipartUploadResponse). Whether the object is complete
            // is settled by the HEAD check (size + SHA-256) that follows every upload.
            Err(err)
                if err
                    .raw_response()
                    .is_some_and(|r| r.status().as_u16() == 200) =>
            {
                tracing::debug!(
                    key,
                    "unparsable 200 answer to complete multipart upload; verifying with HEAD"
                );
            }
            Err(err) => return Err(self.classify("complete multipart upload", key, err)),
        }
        Ok(())
    }

    /// Uploads parts `1..=parts`, at most [`PART_CONCURRENCY`] at a time, in part order.
    #[allow(clippy::too_many_arguments)]
    async fn upload_parts(
        &self,
        full: &str,
        key: &str,
        src: &Path,
        size: u64,
        part_size: u64,
        parts: u64,
        upload_id: &str,
    ) -> Result<Vec<CompletedPart>, StorageError> {
        let mut tasks = tokio::task::JoinSet::new();
        let mut done: Vec<CompletedPart> = Vec::with_capacity(parts as usize);
        let mut next = 1u64;
        let started = Instant::now();
        while next <= parts || !tasks.is_empty() {
            while next <= parts && tasks.len() < PART_CONCURRENCY {
                let offset = (next - 1) * part_size;
                let part = Part {
                    client: self.client.clone(),
                    bucket: self.bucket.clone(),
                    key: full.to_string(),
                    upload_id: upload_id.to_string(),
                    src: src.to_path_buf(),
                    number: next as i32,
                    offset,
                    len: part_size.min(size - offset),
                };
                tasks.spawn(part.send());
                next += 1;
            }
            match tasks.join_next().await {
                Some(Ok(Ok(part))) => {
                    done.push(part);
                    tracing::debug!(key, part = done.len(), parts, "uploaded part");
                }
                Some(Ok(Err(err))) => return Err(self.classify("upload part of", key, err)),
                Some(Err(join)) => {
                    return Err(StorageError::Transient(format!(
                        "upload {}/{key}: part task failed: {join}",
                        self.url
                    )))
                }
                None => break,
            }
        }
        done.sort_by_key(|p| p.part_number());
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        tracing::info!(
            key,
            mib = size / (1024 * 1024),
            mib_per_s = format!("{:.1}", size as f64 / secs / 1048576.0),
            "multipart upload done"
        );
        Ok(done)
    }

    async fn get(&self, full: &str, key: &str, dest: &Path) -> Result<ObjectInfo, StorageError> {
        let mut object = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
            .map_err(|e| self.classify("download", key, e))?;
        let expected_len = object.content_length().map(|n| n as u64);
        let expected_sha = object.metadata().and_then(|m| m.get(SHA256_META)).cloned();
        let etag = object.e_tag().map(str::to_string);
        let modified_ms = object
            .last_modified()
            .and_then(|t| t.to_millis().ok())
            .map(|m| m as u64);
        let mut partial = Partial::new(dest)?;
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        loop {
            let chunk = object.body.try_next().await.map_err(|e| {
                StorageError::Transient(format!(
                    "download {}/{key}: transfer broke off: {e}",
                    self.url
                ))
            })?;
            let Some(chunk) = chunk else { break };
            hasher.update(&chunk);
            written += chunk.len() as u64;
            partial
                .file()
                .write_all(&chunk)
                .map_err(|e| StorageError::local("cannot write", dest, e))?;
        }
        if expected_len.is_some_and(|n| n != written) {
            return Err(StorageError::Integrity(format!(
                "download {}/{key}: got {written} of {} bytes",
                self.url,
                expected_len.unwrap_or_default()
            )));
        }
        let got_sha = hex(&hasher.finalize());
        if let Some(want) = expected_sha {
            if want != got_sha {
                return Err(StorageError::Integrity(format!(
                    "download {}/{key}: SHA-256 {got_sha} differs from the uploaded {want}",
                    self.url
                )));
            }
        }
        partial.commit()?;
        Ok(ObjectInfo {
            key: key.to_string(),
            size: written,
            etag,
            modified_ms,
        })
    }

    async fn head_full(
        &self,
        full: &str,
        key: &str,
    ) -> Result<Option<(ObjectInfo, Option<String>)>, StorageError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
        {
            Ok(head) => Ok(Some((
                ObjectInfo {
                    key: key.to_string(),
                    size: head.content_length().unwrap_or(0) as u64,
                    etag: head.e_tag().map(str::to_string),
                    modified_ms: head
                        .last_modified()
                        .and_then(|t| t.to_millis().ok())
                        .map(|m| m as u64),
                },
                head.metadata().and_then(|m| m.get(SHA256_META)).cloned(),
            ))),
            Err(err) => match self.classify("stat", key, err) {
                StorageError::NotFound(_) => Ok(None),
                // HEAD has no body, so a missing bucket shows as a bare 404 above; other errors pass.
                other => Err(other),
            },
        }
    }
}

/// One part of a multipart upload, owned so it can run as its own task.
struct Part {
    client: Client,
    bucket: String,
    key: String,
    upload_id: String,
    src: PathBuf,
    number: i32,
    offset: u64,
    len: u64,
}

impl Part {
    async fn send(
        self,
    ) -> Result<
        CompletedPart,
        SdkError<aws_sdk_s3::operation::upload_part::UploadPartError, HttpResponse>,
    > {
        let (src, offset, len) = (self.src.clone(), self.offset, self.len);
        let md5 = tokio::task::spawn_blocking(move || md5_of(&src, offset, len))
            .await
            .map_err(SdkError::construction_failure)?
            .map_err(SdkError::construction_failure)?;
        let body = ByteStream::read_from()
            .path(&self.src)
            .offset(self.offset)
            .length(Length::Exact(self.len))
            .build()
            .await
            .map_err(SdkError::construction_failure)?;
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .part_number(self.number)
            .content_length(self.len as i64)
            .content_md5(base64_md5(&md5))
            .body(body)
            .send()
            .await?;
        Ok(CompletedPart::builder()
            .part_number(self.number)
            .set_e_tag(out.e_tag().map(str::to_string))
            .build())
    }
}

impl ObjectStore for S3Store {
    fn url(&self) -> &str {
        &self.url
    }

    fn put_file(&self, key: &str, src: &Path) -> Result<ObjectInfo, StorageError> {
        let full = self.full_key(key)?;
        let size = local_size(src)?;
        let sha256 = sha256_of(src)?;
        self.runtime.block_on(async {
            if size <= self.part_size {
                self.put_single(&full, key, src, size, &sha256).await?;
            } else {
                self.put_multipart(&full, key, src, size, &sha256).await?;
            }
            // Read back what the store holds before the upload counts as done.
            let (info, stored_sha) = self.head_full(&full, key).await?.ok_or_else(|| {
                StorageError::Integrity(format!("upload {}/{key}: object missing after upload", self.url))
            })?;
            if info.size != size || stored_sha.as_deref() != Some(sha256.as_str()) {
                return Err(StorageError::Integrity(format!(
                    "upload {}/{key}: store holds {} bytes (SHA-256 {:?}), sent {size} bytes ({sha256})",
                    self.url, info.size, stored_sha
                )));
            }
            Ok(info)
        })
    }

    fn get_file(&self, key: &str, dest: &Path) -> Result<ObjectInfo, StorageError> {
        let full = self.full_key(key)?;
        self.runtime.block_on(self.get(&full, key, dest))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        key::check_prefix(prefix)?;
        let mut full_prefix = key::join(&[&self.prefix, prefix]);
        if prefix.ends_with('/') || (prefix.is_empty() && !self.prefix.is_empty()) {
            full_prefix.push('/');
        }
        self.runtime.block_on(async {
            let mut pages = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&full_prefix)
                .into_paginator()
                .send();
            let mut out = Vec::new();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| self.classify("list", prefix, e))?;
                for object in page.contents() {
                    let Some(full) = object.key() else { continue };
                    out.push(ObjectInfo {
                        key: self.relative_key(full).to_string(),
                        size: object.size().unwrap_or(0) as u64,
                        etag: object.e_tag().map(str::to_string),
                        modified_ms: object
                            .last_modified()
                            .and_then(|t| t.to_millis().ok())
                            .map(|m| m as u64),
                    });
                }
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
    }

    fn delete(&self, key: &str) -> Result<(), StorageError> {
        let full = self.full_key(key)?;
        self.runtime.block_on(async {
            match self
                .client
                .delete_object()
                .bucket(&self.bucket)
                .key(&full)
                .send()
                .await
            {
                Ok(_) => Ok(()),
                Err(err) => match self.classify("delete", key, err) {
                    StorageError::NotFound(_) => Ok(()),
                    other => Err(other),
                },
            }
        })
    }

    fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        let full = self.full_key(key)?;
        self.runtime
            .block_on(self.head_full(&full, key))
            .map(|found| found.map(|(info, _)| info))
    }
}

fn md5_of(path: &Path, offset: u64, len: u64) -> Result<[u8; 16], StorageError> {
    let mut file =
        std::fs::File::open(path).map_err(|e| StorageError::local("cannot read", path, e))?;
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| StorageError::local("cannot read", path, e))?;
    let mut hasher = Md5::new();
    let copied = std::io::copy(&mut file.take(len), &mut hasher)
        .map_err(|e| StorageError::local("cannot read", path, e))?;
    if copied != len {
        return Err(StorageError::Integrity(format!(
            "{}: shrank while uploading",
            path.display()
        )));
    }
    Ok(hasher.finalize().into())
}

fn sha256_of(path: &Path) -> Result<String, StorageError> {
    let mut file =
        std::fs::File::open(path).map_err(|e| StorageError::local("cannot read", path, e))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)
        .map_err(|e| StorageError::local("cannot read", path, e))?;
    Ok(hex(&hasher.finalize()))
}

fn base64_md5(md5: &[u8; 16]) -> String {
    base64::engine::general_purpose::STANDARD.encode(md5)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<S3Settings, StorageError> {
        let map: std::collections::HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        S3Settings::from_lookup(|name| map.get(name).cloned())
    }

    const BASE: &[(&str, &str)] = &[
        ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
        ("AWS_SECRET_ACCESS_KEY", "s3cr3t-value"),
        ("AWS_REGION", "auto"),
    ];

    #[test]
    fn missing_variables_are_named() {
        for skip in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"] {
            let vars: Vec<_> = BASE.iter().copied().filter(|(k, _)| *k != skip).collect();
            let err = settings(&vars).unwrap_err().to_string();
            assert!(err.contains(skip), "{err}");
        }
    }

    #[test]
    fn endpoint_precedence_and_validation() {
        let mut vars = BASE.to_vec();
        vars.push(("AWS_ENDPOINT_URL", "http://127.0.0.1:9000"));
        assert_eq!(
            settings(&vars).unwrap().endpoint.as_deref(),
            Some("http://127.0.0.1:9000")
        );
        vars.push((
            "AWS_ENDPOINT_URL_S3",
            "https://acct.r2.cloudflarestorage.com",
        ));
        assert_eq!(
            settings(&vars).unwrap().endpoint.as_deref(),
            Some("https://acct.r2.cloudflarestorage.com")
        );
        let mut bad = BASE.to_vec();
        bad.push(("AWS_ENDPOINT_URL", "localhost:9000"));
        assert!(settings(&bad)
            .unwrap_err()
            .to_string()
            .contains("AWS_ENDPOINT_URL"));
    }

    #[test]
    fn debug_output_hides_secrets() {
        let mut vars = BASE.to_vec();
        vars.push(("AWS_SESSION_TOKEN", "tok-123"));
        let text = format!("{:?}", settings(&vars).unwrap());
        for secret in ["AKIDEXAMPLE", "s3cr3t-value", "tok-123"] {
            assert!(!text.contains(secret), "{text}");
        }
    }

    #[test]
    fn md5_covers_exactly_the_part() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        assert_eq!(
            md5_of(&path, 2, 3).unwrap(),
            <[u8; 16]>::from(Md5::digest(b"234"))
        );
        assert!(md5_of(&path, 8, 5).is_err());
    }
}
