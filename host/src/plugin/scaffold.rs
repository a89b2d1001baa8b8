//! `ferrotune plugin new NAME --kind formatter`: writes a plugin crate (Cargo.toml, src/lib.rs
//! with a working example and its tests, README) that builds outside this repository with
//! `cargo build --release --target wasm32-wasip2`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::wasm_profile::WASM_RELEASE_PROFILE;
use crate::cli::UsageError;

/// Where the SDK of the checkout this binary was built from lives (used when it still exists).
const BUILD_SDK_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../plugin-sdk");

/// Writes the crate `parent/name` and returns its directory.
pub fn new_formatter(name: &str, parent: &Path, sdk: Option<&Path>) -> Result<PathBuf> {
    check_name(name)?;
    let sdk = sdk_dir(sdk)?;
    let dir = parent.join(name);
    if dir.exists() {
        return Err(UsageError::new(format!(
            "plugin new {name}: {} already exists; pick another NAME or --dir",
            dir.display()
        ))
        .into());
    }
    std::fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("create {}", dir.display()))?;
    let files = [
        ("Cargo.toml", cargo_toml(name, &sdk)),
        ("src/lib.rs", LIB_RS.replace("{name}", name)),
        (
            "README.md",
            README
                .replace("{name}", name)
                .replace("{crate}", &name.replace('-', "_")),
        ),
        (".gitignore", "/target\n".to_string()),
    ];
    for (file, text) in files {
        std::fs::write(dir.join(file), text).with_context(|| format!("write {file}"))?;
    }
    Ok(dir)
}

/// Cargo package names: lower-case ASCII letters, digits and `-`, starting with a letter.
fn check_name(name: &str) -> Result<(), UsageError> {
    let ok = name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(UsageError::new(format!(
            "plugin new {name:?}: use lower-case letters, digits and '-', starting with a letter (e.g. my-formatter)"
        )))
    }
}

fn sdk_dir(given: Option<&Path>) -> Result<PathBuf> {
    let candidate = given.map_or_else(|| PathBuf::from(BUILD_SDK_DIR), Path::to_path_buf);
    if candidate.join("Cargo.toml").is_file() {
        return Ok(std::fs::canonicalize(&candidate)?);
    }
    Err(UsageError::new(match given {
        Some(dir) => format!(
            "--sdk_path {}: no Cargo.toml there; pass the plugin-sdk folder of a ferrotune checkout",
            dir.display()
        ),
        None => format!(
            "plugin new: the SDK this ferrotune was built from ({BUILD_SDK_DIR}) is gone; \
             pass --sdk_path DIR (the plugin-sdk folder of a ferrotune checkout)"
        ),
    })
    .into())
}

fn cargo_toml(name: &str, sdk: &Path) -> String {
    let profile: String = WASM_RELEASE_PROFILE
        .iter()
        .map(|(key, value)| format!("{key} = {value}\n"))
        .collect();
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
# cdylib: the wasm32-wasip2 component ferrotune loads; rlib: `cargo test` on the host.
crate-type = ["cdylib", "rlib"]

[dependencies]
ferrotune-plugin-sdk = {{ path = {sdk:?} }}
serde = {{ version = "1", features = ["derive"] }}

# Small components; wasm has no unwinding (a panic is a trap the host reports).
[profile.release]
{profile}
# A crate of its own, even inside another workspace.
[workspace]
"#,
        sdk = sdk.display().to_string()
    )
}

const LIB_RS: &str = r#"//! {name}: a ferrotune dataset formatter. Each row {"question": ..., "answer": ...} becomes
//! a chat (optionally after a system message from the config); ferrotune applies the model's
//! chat template and, with --train_on_completions, learns only the answer.

use ferrotune_plugin_sdk::{export_formatter, Formatter, Message, Sample};
use serde::Deserialize;

/// `--formatter_config` (every key optional).
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// A system message put before every conversation.
    pub system: Option<String>,
}

/// The columns this formatter reads (other columns are ignored).
#[derive(Deserialize)]
pub struct Row {
    pub question: String,
    pub answer: String,
}

pub struct Plugin {
    config: Config,
}

impl Formatter for Plugin {
    const NAME: &'static str = "{name}";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "question/answer rows as a chat";
    type Config = Config;
    type Row = Row;

    fn new(config: Config) -> Result<Self, String> {
        Ok(Plugin { config })
    }

    fn format(&self, row: Row) -> Result<Sample, String> {
        if row.answer.trim().is_empty() {
            return Err("column \"answer\" is empty".into());
        }
        let system = self.config.system.clone().map(Message::system);
        let turns = [Message::user(row.question), Message::assistant(row.answer)];
        Ok(Sample::chat(system.into_iter().chain(turns)))
    }
}

export_formatter!(Plugin);

#[cfg(test)]
mod tests {
    use super::*;
    use ferrotune_plugin_sdk::serde_json::json;
    use ferrotune_plugin_sdk::testing::Harness;

    #[test]
    fn formats_a_row_as_a_chat() {
        let h = Harness::<Plugin>::new(json!({"system": "Be brief."})).unwrap();
        let sample = h.format(json!({"question": "2+2?", "answer": "4"})).unwrap();
        let expected = [Message::system("Be brief."), Message::user("2+2?"), Message::assistant("4")];
        assert_eq!(sample, Sample::chat(expected));
    }

    #[test]
    fn bad_rows_are_errors() {
        let h = Harness::<Plugin>::new(json!(null)).unwrap();
        assert!(h.format(json!({"question": "q", "answer": " "})).is_err());
        let missing = h.format(json!({"question": "q"})).unwrap_err();
        assert!(missing.contains("missing field `answer`"), "{missing}");
    }
}
"#;

const README: &str = r#"# {name}

A ferrotune dataset formatter (WASM component, world `ferrotune:plugin/formatter@0.1.0`).

```sh
cargo test                                           # unit tests, natively
cargo build --release --target wasm32-wasip2         # needs: rustup target add wasm32-wasip2
ferrotune plugin inspect target/wasm32-wasip2/release/{crate}.wasm
ferrotune --formatter target/wasm32-wasip2/release/{crate}.wasm \
          --formatter_config '{"system": "Be brief."}' --dataset data.jsonl ...
```

Rows arrive as JSON objects; return `Err("...")` for a bad row (ferrotune fails the job or
skips it with `--on_bad_row skip`). The plugin runs sandboxed: no files, no network, no
environment, a memory limit and a deadline per batch. See ferrotune's docs/plugins.md.
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_crate_with_the_sdk_path_and_profile() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = new_formatter("qa-fmt", tmp.path(), None).unwrap();
        let toml = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        assert!(toml.contains("name = \"qa-fmt\""), "{toml}");
        assert!(toml.contains("plugin-sdk"), "{toml}");
        assert!(toml.contains("panic = \"abort\""), "{toml}");
        let lib = std::fs::read_to_string(dir.join("src/lib.rs")).unwrap();
        assert!(lib.contains("const NAME: &'static str = \"qa-fmt\";"));
        assert!(
            new_formatter("qa-fmt", tmp.path(), None).is_err(),
            "existing dir"
        );
        for bad in ["Qa", "1qa", "qa_fmt", "qa-", ""] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
