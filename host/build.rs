//! Builds the built-in plugins (and the sandbox-test fixture) as wasm32-wasip2 components and
//! puts them in OUT_DIR, where `src/plugin/builtin.rs` embeds them with `include_bytes!`: the
//! single `ferrotune` binary carries its formatters.
//!
//! The inner `cargo build` uses its own target directory (`<target>/plugin-wasm`) so it never
//! waits on the lock the outer build holds, and it shares the outer build's jobserver, so the
//! two builds together use no more cores than asked for.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

include!("src/plugin/wasm_profile.rs");

const WASM_TARGET: &str = "wasm32-wasip2";

/// (package, file name in OUT_DIR). The last one is a test fixture, never embedded.
const PLUGINS: [(&str, &str); 5] = [
    ("ferrotune-plugin-alpaca", "alpaca.wasm"),
    ("ferrotune-plugin-chat", "chat.wasm"),
    ("ferrotune-plugin-text", "text.wasm"),
    (
        "ferrotune-plugin-prompt-completion",
        "prompt-completion.wasm",
    ),
    ("ferrotune-plugin-evil", "evil.wasm"),
];

/// Sync policies, never embedded: the example `sync-sparse` is what tests pass as a user's
/// `.wasm`. Built by their own cargo invocation: the SDK carries one world's bindings per
/// feature, and one invocation would unify the features of every plugin in it.
const SYNC_PLUGINS: [(&str, &str); 1] = [("ferrotune-plugin-sync-sparse", "sync-sparse.wasm")];

/// Storage backends, never embedded: the example `http-store` (WebDAV) is what tests pass as a
/// user's `--sync_to PLUGIN.wasm`. Their own invocation, for the same reason.
const STORAGE_PLUGINS: [(&str, &str); 1] = [("ferrotune-plugin-http-store", "http-store.wasm")];

/// Publish steps, embedded (`src/plugin/publish_host.rs`): `hf-publish` pushes to the Hub. Their
/// own invocation, for the same reason.
const PUBLISH_PLUGINS: [(&str, &str); 1] = [("ferrotune-plugin-hf-publish", "hf-publish.wasm")];

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    for watched in [
        "plugins",
        "plugin-sdk",
        "wit",
        "tests/fixtures/plugins",
        "Cargo.lock",
    ] {
        println!("cargo::rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo::rerun-if-changed=src/plugin/wasm_profile.rs");

    let wasm_target_dir = target_dir(&out_dir, &root).join("plugin-wasm");
    check_wasm_target();

    for group in [
        &PLUGINS[..],
        &SYNC_PLUGINS[..],
        &STORAGE_PLUGINS[..],
        &PUBLISH_PLUGINS[..],
    ] {
        build_plugins(&root, &wasm_target_dir, group);
    }

    let built = wasm_target_dir.join(WASM_TARGET).join("release");
    for (package, name) in PLUGINS
        .iter()
        .chain(&SYNC_PLUGINS)
        .chain(&STORAGE_PLUGINS)
        .chain(&PUBLISH_PLUGINS)
    {
        let file = built.join(format!("{}.wasm", package.replace('-', "_")));
        std::fs::copy(&file, out_dir.join(name))
            .unwrap_or_else(|e| panic!("copy {}: {e}", file.display()));
    }
    println!(
        "cargo::rustc-env=FERROTUNE_PLUGIN_TARGET_DIR={}",
        wasm_target_dir.display()
    );
    println!(
        "cargo::rustc-env=FERROTUNE_EVIL_PLUGIN={}",
        out_dir.join("evil.wasm").display()
    );
    println!(
        "cargo::rustc-env=FERROTUNE_SYNC_SPARSE_PLUGIN={}",
        out_dir.join("sync-sparse.wasm").display()
    );
    println!(
        "cargo::rustc-env=FERROTUNE_HTTP_STORE_PLUGIN={}",
        out_dir.join("http-store.wasm").display()
    );
}

/// One `cargo build` of `plugins` for wasm32-wasip2 into `wasm_target_dir`.
fn build_plugins(root: &Path, wasm_target_dir: &Path, plugins: &[(&str, &str)]) {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args([
            "build",
            "--release",
            "--target",
            WASM_TARGET,
            "--target-dir",
        ])
        .arg(wasm_target_dir);
    for (package, _) in plugins {
        cmd.args(["-p", package]);
    }
    // Flags meant for the host build (or a clippy/coverage wrapper) must not reach wasm code.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    for (key, value) in wasm_release_profile_env() {
        cmd.env(key, value);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the built-in plugins: {e}"));
    if !status.success() {
        panic!(
            "building the built-in plugins for {WASM_TARGET} failed (see the cargo output above); \
             if the target is missing, run `rustup target add {WASM_TARGET}`"
        );
    }
}

/// The outer build's target directory: the ancestor of OUT_DIR that holds cargo's CACHEDIR.TAG.
fn target_dir(out_dir: &Path, root: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| root.join("target"))
}

/// Fails early with the fix when the standard library for wasm32-wasip2 is not installed.
fn check_wasm_target() {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = Command::new(rustc).args(["--print", "sysroot"]).output() else {
        return; // cargo will report the real problem
    };
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !sysroot.join("lib/rustlib").join(WASM_TARGET).is_dir() {
        panic!(
            "the built-in plugins need the {WASM_TARGET} standard library, which is not installed \
             in {}; run `rustup target add {WASM_TARGET}`",
            sysroot.display()
        );
    }
}
