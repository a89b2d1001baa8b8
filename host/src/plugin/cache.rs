//! On-disk cache of compiled components, so a plugin is compiled once per machine, not once per
//! job. The key is the SHA-256 of the component bytes plus wasmtime's compatibility hash of the
//! Engine (wasmtime version, target, compiler settings): a different ferrotune build never
//! loads another's machine code.
//!
//! Trust: `Component::deserialize_file` runs the file's machine code as is, so entries are
//! written atomically (temporary file + rename) into a directory only this user writes, and a
//! file that fails to deserialize is recompiled and replaced.

use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

use super::wasm_err;

/// Where a component came from on this load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Loaded precompiled from the cache.
    Hit,
    /// Compiled now (and stored, if the cache is writable).
    Compiled,
}

/// The cache directory: `FERROTUNE_CACHE_DIR`, else `$XDG_CACHE_HOME/ferrotune`, else
/// `~/.cache/ferrotune`; components live in its `plugins/` folder.
pub fn default_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("FERROTUNE_CACHE_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => match std::env::var_os("XDG_CACHE_HOME") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("ferrotune"),
            _ => PathBuf::from(std::env::var_os("HOME")?)
                .join(".cache")
                .join("ferrotune"),
        },
    };
    Some(base.join("plugins"))
}

/// Compiles `wasm`, or loads its compiled form from `dir`.
pub fn load(engine: &Engine, dir: Option<&Path>, wasm: &[u8]) -> Result<(Component, CacheOutcome)> {
    let Some(dir) = dir else {
        return Ok((
            Component::new(engine, wasm).map_err(wasm_err)?,
            CacheOutcome::Compiled,
        ));
    };
    let file = dir.join(format!("{}.cwasm", key(engine, wasm)));
    if file.is_file() {
        // SAFETY: the file was written by `store` below from `Component::serialize` of these
        // exact bytes under the same engine configuration (both are in the file name).
        match unsafe { Component::deserialize_file(engine, &file) } {
            Ok(component) => return Ok((component, CacheOutcome::Hit)),
            Err(e) => {
                tracing::warn!(file = %file.display(), "ignoring unusable cached plugin: {e:#}")
            }
        }
    }
    let component = Component::new(engine, wasm).map_err(wasm_err)?;
    if let Err(e) = store(&component, dir, &file) {
        // A read-only cache only costs compile time; say so once per load and carry on.
        tracing::warn!(dir = %dir.display(), "cannot cache the compiled plugin: {e:#}");
    }
    Ok((component, CacheOutcome::Compiled))
}

fn key(engine: &Engine, wasm: &[u8]) -> String {
    let mut engine_hash = std::collections::hash_map::DefaultHasher::new();
    engine
        .precompile_compatibility_hash()
        .hash(&mut engine_hash);
    let mut name = String::with_capacity(64 + 17);
    for byte in Sha256::digest(wasm) {
        let _ = write!(name, "{byte:02x}");
    }
    let _ = write!(name, "-{:016x}", engine_hash.finish());
    name
}

fn store(component: &Component, dir: &Path, file: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let bytes = component.serialize().map_err(wasm_err)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut tmp, &bytes)?;
    tmp.persist(file)?;
    Ok(())
}
