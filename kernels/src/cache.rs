//! On-disk cache of compiled kernels: `<dir>/<module>-<arch>-<key>.cubin`, where the key hashes
//! everything that determines the cubin (source text, target, options, compiler version).
//!
//! The directory is `$FERROTUNE_CACHE_DIR/kernels`, else `$HOME/.cache/ferrotune/kernels`.
//! Entries are written to a temporary file and renamed into place, so concurrent processes never
//! read a half-written cubin; a stale or unreadable entry is simply recompiled.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Environment variable naming ferrotune's cache root.
pub const CACHE_DIR_ENV: &str = "FERROTUNE_CACHE_DIR";

/// Where kernels are cached, or None when neither `$FERROTUNE_CACHE_DIR` nor `$HOME` is set.
pub fn default_dir() -> Option<PathBuf> {
    let root = match std::env::var_os(CACHE_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
            PathBuf::from(home).join(".cache").join("ferrotune")
        }
    };
    Some(root.join("kernels"))
}

/// Hex key of one compilation: any change to source, target, options or compiler changes it.
pub fn key(program: &str, target: &str, options: &[String], compiler: &str) -> String {
    let mut h = Sha256::new();
    for part in [program, target, compiler] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    for o in options {
        h.update((o.len() as u64).to_le_bytes());
        h.update(o.as_bytes());
    }
    let digest = h.finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Clone)]
pub struct KernelCache {
    dir: PathBuf,
}

impl KernelCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, module: &str, target: &str, key: &str) -> PathBuf {
        self.dir.join(format!("{module}-{target}-{key}.cubin"))
    }

    /// The cached cubin, if present and non-empty.
    pub fn get(&self, module: &str, target: &str, key: &str) -> Option<Vec<u8>> {
        fs::read(self.path(module, target, key))
            .ok()
            .filter(|b| !b.is_empty())
    }

    /// Stores a cubin atomically (temporary file + rename).
    pub fn put(&self, module: &str, target: &str, key: &str, cubin: &[u8]) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let path = self.path(module, target, key);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        fs::write(&tmp, cubin)?;
        fs::rename(&tmp, &path).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_changes_with_every_input_and_is_stable() {
        let o = vec!["--std=c++17".to_string()];
        let k = key("src", "sm_90a", &o, "nvrtc 13.0");
        assert_eq!(k, key("src", "sm_90a", &o, "nvrtc 13.0"));
        assert_eq!(k.len(), 32);
        assert_ne!(k, key("src2", "sm_90a", &o, "nvrtc 13.0"));
        assert_ne!(k, key("src", "sm_89", &o, "nvrtc 13.0"));
        assert_ne!(k, key("src", "sm_90a", &[], "nvrtc 13.0"));
        assert_ne!(k, key("src", "sm_90a", &o, "nvrtc 12.8"));
        // Length prefixes keep concatenations apart.
        assert_ne!(key("ab", "c", &[], "x"), key("a", "bc", &[], "x"));
    }

    #[test]
    fn put_then_get_round_trips_and_misses_are_none() {
        let dir = std::env::temp_dir().join(format!("ft-kcache-{}", std::process::id()));
        let cache = KernelCache::new(&dir);
        assert!(cache.get("rope", "sm_80", "k1").is_none());
        cache.put("rope", "sm_80", "k1", b"\x7fELFcubin").unwrap();
        assert_eq!(cache.get("rope", "sm_80", "k1").unwrap(), b"\x7fELFcubin");
        assert!(cache.get("rope", "sm_86", "k1").is_none());
        fs::remove_dir_all(&dir).unwrap();
    }
}
