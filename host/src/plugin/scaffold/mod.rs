//! `ferrotune plugin new NAME --kind formatter|sync|publish`: writes a plugin crate
//! (Cargo.toml, src/lib.rs with a working example and its tests, README) that builds outside
//! this repository with `cargo build --release --target wasm32-wasip2`. The examples live in
//! `formatter/`, `sync/` and `publish/` beside this file, with `{name}` (and `{crate}` in
//! READMEs) filled in.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::wasm_profile::WASM_RELEASE_PROFILE;
use crate::cli::choices::PluginKind;
use crate::cli::UsageError;

/// Where the SDK of the checkout this binary was built from lives (used when it still exists).
const BUILD_SDK_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../plugin-sdk");

/// One kind's example crate.
struct Template {
    /// The SDK dependency's features beyond `path` (a component carries one world's bindings).
    sdk_features: &'static str,
    /// Dependencies beyond the SDK and serde (Cargo.toml lines).
    extra_deps: &'static str,
    lib_rs: &'static str,
    readme: &'static str,
    /// The training flags that load the built component (at `{wasm}`).
    run_flags: &'static str,
}

/// A crate written by [`new_plugin`].
#[derive(Debug)]
pub struct Created {
    pub dir: PathBuf,
    /// The training flags that load the built component (at `{wasm}`).
    pub run_flags: &'static str,
}

const FORMATTER: Template = Template {
    sdk_features: "",
    extra_deps: "",
    lib_rs: include_str!("formatter/lib.rs.tmpl"),
    readme: include_str!("formatter/README.md.tmpl"),
    run_flags: "--formatter {wasm}",
};

const SYNC: Template = Template {
    sdk_features: r#", default-features = false, features = ["sync"]"#,
    extra_deps: "",
    lib_rs: include_str!("sync/lib.rs.tmpl"),
    readme: include_str!("sync/README.md.tmpl"),
    run_flags: r#"--sync {wasm} --sync_config '{"storage": "s3://BUCKET/PREFIX", "keep_last": 2}'"#,
};

const PUBLISH: Template = Template {
    sdk_features: r#", default-features = false, features = ["publish"]"#,
    extra_deps: "base64 = \"0.22\"\n",
    lib_rs: include_str!("publish/lib.rs.tmpl"),
    readme: include_str!("publish/README.md.tmpl"),
    run_flags: r#"--save_model --publish {wasm} --publish_config '{"base_url": "https://HOST/DIR", "allow_hosts": ["HOST:443"]}'"#,
};

fn template(kind: PluginKind) -> Result<&'static Template, UsageError> {
    match kind {
        PluginKind::Formatter => Ok(&FORMATTER),
        PluginKind::Sync => Ok(&SYNC),
        PluginKind::Publish => Ok(&PUBLISH),
        // A whole object store does not fit a small example; the built-in is the starting point.
        PluginKind::Storage => Err(UsageError::new(
            "plugin new --kind storage: no scaffold for this kind; start from the WebDAV example \
             in plugins/http-store and docs/plugins.md (SDK feature \"storage\"), or use --kind \
             formatter, sync or publish",
        )),
    }
}

/// Writes the crate `parent/name` of `kind`.
pub fn new_plugin(
    kind: PluginKind,
    name: &str,
    parent: &Path,
    sdk: Option<&Path>,
) -> Result<Created> {
    let template = template(kind)?;
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
        ("Cargo.toml", cargo_toml(name, &sdk, template)),
        ("src/lib.rs", template.lib_rs.replace("{name}", name)),
        (
            "README.md",
            template
                .readme
                .replace("{name}", name)
                .replace("{crate}", &name.replace('-', "_")),
        ),
        (".gitignore", "/target\n".to_string()),
    ];
    for (file, text) in files {
        std::fs::write(dir.join(file), text).with_context(|| format!("write {file}"))?;
    }
    Ok(Created {
        dir,
        run_flags: template.run_flags,
    })
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

fn cargo_toml(name: &str, sdk: &Path, template: &Template) -> String {
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
ferrotune-plugin-sdk = {{ path = {sdk:?}{sdk_features} }}
serde = {{ version = "1", features = ["derive"] }}
{extra_deps}
# Small components; wasm has no unwinding (a panic is a trap the host reports).
[profile.release]
{profile}
# A crate of its own, even inside another workspace.
[workspace]
"#,
        sdk = sdk.display().to_string(),
        sdk_features = template.sdk_features,
        extra_deps = template.extra_deps,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_crate_with_the_sdk_path_and_profile() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = new_plugin(PluginKind::Formatter, "qa-fmt", tmp.path(), None)
            .unwrap()
            .dir;
        let toml = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        assert!(toml.contains("name = \"qa-fmt\""), "{toml}");
        assert!(toml.contains("plugin-sdk\" }"), "default features: {toml}");
        assert!(toml.contains("panic = \"abort\""), "{toml}");
        let lib = std::fs::read_to_string(dir.join("src/lib.rs")).unwrap();
        assert!(lib.contains("const NAME: &'static str = \"qa-fmt\";"));
        assert!(
            new_plugin(PluginKind::Formatter, "qa-fmt", tmp.path(), None).is_err(),
            "existing dir"
        );
        for bad in ["Qa", "1qa", "qa_fmt", "qa-", ""] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_sync_policy_depends_on_the_sync_world_only() {
        let tmp = tempfile::tempdir().unwrap();
        let created = new_plugin(PluginKind::Sync, "ck-sync", tmp.path(), None).unwrap();
        assert!(created.run_flags.starts_with("--sync {wasm} "));
        let dir = created.dir;
        let toml = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        assert!(
            toml.contains(r#"default-features = false, features = ["sync"] }"#),
            "{toml}"
        );
        let lib = std::fs::read_to_string(dir.join("src/lib.rs")).unwrap();
        assert!(lib.contains("const NAME: &'static str = \"ck-sync\";"));
        assert!(lib.contains("export_sync_policy!(Policy);"));
        let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
        assert!(readme.contains("release/ck_sync.wasm"), "{readme}");
    }

    #[test]
    fn a_publish_step_depends_on_the_publish_world_and_base64() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = new_plugin(PluginKind::Publish, "put-up", tmp.path(), None)
            .unwrap()
            .dir;
        let toml = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        assert!(
            toml.contains(r#"default-features = false, features = ["publish"] }"#)
                && toml.contains("base64 = \"0.22\"\n"),
            "{toml}"
        );
        let lib = std::fs::read_to_string(dir.join("src/lib.rs")).unwrap();
        assert!(lib.contains("export_publisher!(Plugin);"));
    }

    #[test]
    fn storage_has_no_scaffold_names_its_example_and_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let err = new_plugin(PluginKind::Storage, "mine", tmp.path(), None).unwrap_err();
        assert!(err.to_string().contains("plugins/http-store"), "{err}");
        assert!(!tmp.path().join("mine").exists());
    }
}
