//! `ferrotune plugin inspect FILE.wasm`: kind, WIT version, self-description and config schema.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use super::formatter::describe_component;
use super::runtime::PluginRuntime;
use super::world::{self, Kind};
use crate::cli::UsageError;

/// The report `plugin inspect` prints.
pub fn inspect(runtime: &PluginRuntime, file: &Path) -> Result<String> {
    let wasm = std::fs::read(file).map_err(|e| {
        UsageError::new(format!(
            "plugin inspect {}: cannot read it ({e}); pass a .wasm component",
            file.display()
        ))
    })?;
    let name = super::file_label(file);
    let component = runtime.component(&name, &wasm)?;
    let found = world::detect(runtime.engine(), &component, &name)?;
    let mut out = String::new();
    writeln!(out, "file:        {}", file.display())?;
    writeln!(out, "kind:        {}", found.kind)?;
    writeln!(
        out,
        "world:       {}/{}@{}",
        world::PACKAGE,
        found.kind,
        found.version
    )?;
    let info = match found.kind {
        Kind::Formatter => describe_component(runtime, &name, &wasm)?.1,
        Kind::Storage => super::storage_host::describe_component(runtime, &name, &wasm)?,
        Kind::Sync => super::sync_policy::describe_component(runtime, &name, &wasm)?,
        Kind::Publish => super::publish_host::describe_component(runtime, &name, &wasm)?,
    };
    writeln!(out, "name:        {}", info.name)?;
    writeln!(out, "version:     {}", info.version)?;
    writeln!(out, "description: {}", info.description)?;
    match info.config_schema {
        Some(schema) => {
            let pretty = serde_json::from_str::<serde_json::Value>(&schema)
                .and_then(|v| serde_json::to_string_pretty(&v))
                .unwrap_or(schema);
            writeln!(out, "config schema:\n{pretty}")?;
        }
        None => writeln!(out, "config schema: (none published)")?,
    }
    Ok(out)
}
