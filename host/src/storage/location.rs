//! Parsing storage URLs: `file:///abs/dir`, `s3://bucket[/prefix]`, or the path of a storage
//! plugin (`PATH.wasm`), with `{job_id}` replaced by `KELPIE_JOB_ID` so that concurrent jobs
//! never share a prefix.

use std::path::PathBuf;

use super::StorageError;

/// A parsed storage URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageUrl {
    File {
        root: PathBuf,
    },
    S3 {
        bucket: String,
        prefix: String,
    },
    /// A storage backend as a `.wasm` component (the `storage` world), configured by
    /// `--sync_config` key `storage_config`.
    Plugin {
        path: PathBuf,
    },
}

impl StorageUrl {
    /// Parses `url`, substituting `{job_id}` from the environment.
    pub fn parse(url: &str) -> Result<Self, StorageError> {
        let job_id = std::env::var("KELPIE_JOB_ID").ok();
        Self::parse_with_job_id(url, job_id.as_deref())
    }

    pub fn parse_with_job_id(url: &str, job_id: Option<&str>) -> Result<Self, StorageError> {
        let url = expand_job_id(url, job_id)?;
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(StorageError::Config(format!(
                    "storage URL {url:?}: a file URL needs an absolute path, e.g. file:///data/ckpts"
                )));
            }
            return Ok(StorageUrl::File {
                root: PathBuf::from(path),
            });
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if !valid_bucket(bucket) {
                return Err(StorageError::Config(format!(
                    "storage URL {url:?}: {bucket:?} is not a bucket name (3-63 characters of \
                     a-z, 0-9, '.', '-'); use s3://BUCKET/PREFIX"
                )));
            }
            let prefix = prefix.trim_end_matches('/');
            if !prefix.is_empty() {
                super::key::check(prefix).map_err(|e| {
                    StorageError::Config(format!("storage URL {url:?}: bad prefix ({e})"))
                })?;
            }
            return Ok(StorageUrl::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
            });
        }
        if url.ends_with(".wasm") && !url.contains("://") {
            return Ok(StorageUrl::Plugin {
                path: PathBuf::from(url),
            });
        }
        Err(StorageError::Config(format!(
            "storage URL {url:?}: unsupported scheme; use file:///DIR, s3://BUCKET/PREFIX or a \
             storage plugin PATH.wasm"
        )))
    }
}

pub(crate) fn expand_job_id(url: &str, job_id: Option<&str>) -> Result<String, StorageError> {
    if !url.contains("{job_id}") {
        return Ok(url.to_string());
    }
    match job_id.filter(|id| !id.is_empty()) {
        Some(id) if super::key::check(id).is_ok() && !id.contains('/') => {
            Ok(url.replace("{job_id}", id))
        }
        Some(id) => Err(StorageError::Config(format!(
            "storage URL {url:?}: KELPIE_JOB_ID {id:?} cannot be used in a key"
        ))),
        None => Err(StorageError::Config(format!(
            "storage URL {url:?} uses {{job_id}} but KELPIE_JOB_ID is not set; set it or \
             write the prefix out"
        ))),
    }
}

/// S3's bucket naming rules (lower case, digits, dots, hyphens; 3–63 characters).
fn valid_bucket(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<StorageUrl, StorageError> {
        StorageUrl::parse_with_job_id(url, Some("job-42"))
    }

    #[test]
    fn parses_both_schemes() {
        assert_eq!(
            parse("file:///tmp/x").unwrap(),
            StorageUrl::File {
                root: "/tmp/x".into()
            }
        );
        assert_eq!(
            parse("s3://my-bucket/jobs/{job_id}/").unwrap(),
            StorageUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: "jobs/job-42".into()
            }
        );
        assert_eq!(
            parse("plugins/{job_id}/dav.wasm").unwrap(),
            StorageUrl::Plugin {
                path: "plugins/job-42/dav.wasm".into()
            }
        );
        assert_eq!(
            parse("s3://my-bucket").unwrap(),
            StorageUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: "".into()
            }
        );
    }

    #[test]
    fn rejects_bad_urls_with_the_fix() {
        for (url, needle) in [
            ("file://rel/dir", "absolute path"),
            ("s3://Bad_Bucket/x", "not a bucket name"),
            ("s3://bucket/a/../b", "bad prefix"),
            ("gs://bucket/x", "unsupported scheme"),
            ("gs://bucket/x.wasm", "unsupported scheme"),
        ] {
            let err = parse(url).unwrap_err().to_string();
            assert!(err.contains(needle), "{url}: {err}");
        }
    }

    #[test]
    fn job_id_placeholder_needs_kelpie_job_id() {
        let err = StorageUrl::parse_with_job_id("s3://b-1/jobs/{job_id}", None).unwrap_err();
        assert!(
            err.to_string().contains("KELPIE_JOB_ID is not set"),
            "{err}"
        );
        let err = StorageUrl::parse_with_job_id("s3://b-1/{job_id}", Some("../x")).unwrap_err();
        assert!(err.to_string().contains("cannot be used"), "{err}");
    }
}
