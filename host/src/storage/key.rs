//! Object keys: `/`-separated relative paths. Checked once here so that no backend can be made
//! to write outside its root (`..`, absolute paths) or create names other stores reject.

use super::StorageError;

/// Accepts `a/b/c.json`; rejects empty keys, empty or dot segments, leading `/`, backslashes and
/// control characters.
pub fn check(key: &str) -> Result<(), StorageError> {
    let bad = |why: &str| {
        Err(StorageError::Config(format!(
            "storage key {key:?} is invalid: {why}"
        )))
    };
    if key.is_empty() {
        return bad("it is empty");
    }
    if key.chars().any(|c| c == '\\' || c.is_control()) {
        return bad("it contains a backslash or a control character");
    }
    for segment in key.split('/') {
        match segment {
            "" => return bad("it has an empty segment (leading, trailing or double '/')"),
            "." | ".." => return bad("'.' and '..' segments are not allowed"),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a listing prefix: empty, or a key prefix (a trailing `/` is allowed).
pub fn check_prefix(prefix: &str) -> Result<(), StorageError> {
    if prefix.is_empty() {
        return Ok(());
    }
    check(prefix.strip_suffix('/').unwrap_or(prefix))
}

/// Joins key segments with `/`, skipping empty ones (so an empty root prefix adds nothing).
pub fn join(parts: &[&str]) -> String {
    parts
        .iter()
        .map(|p| p.trim_matches('/'))
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_relative_paths() {
        for key in ["a", "checkpoint-5/manifest.json", "x/y.z/w-1_2"] {
            check(key).unwrap();
        }
    }

    #[test]
    fn rejects_escapes_and_odd_names() {
        for key in [
            "", "/abs", "a//b", "a/", "../x", "a/./b", "a\\b", "a\nb", "..",
        ] {
            assert!(check(key).is_err(), "{key:?} was accepted");
        }
    }

    #[test]
    fn prefixes_may_be_empty_or_end_in_a_slash() {
        for p in ["", "checkpoint-5/", "checkpoint-", "a/b"] {
            check_prefix(p).unwrap();
        }
        for p in ["/", "/a", "../", "a//"] {
            assert!(check_prefix(p).is_err(), "{p:?} was accepted");
        }
    }

    #[test]
    fn join_skips_empty_parts() {
        assert_eq!(join(&["", "a/", "/b"]), "a/b");
        assert_eq!(join(&["jobs/1", "checkpoint-2/x"]), "jobs/1/checkpoint-2/x");
    }
}
