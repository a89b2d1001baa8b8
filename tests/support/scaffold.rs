//! `ferrotune plugin new`, then the generated crate's own unit tests (`cargo test`) and
//! `cargo build --release --target wasm32-wasip2`, as a plugin author would. Both build in the
//! built-ins' target directory (the wasm build with their profile and the workspace's locked
//! versions, so only the new crate itself compiles there).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Scaffolds `name` of `kind` under `work` and returns the built component.
pub fn scaffold_and_build(kind: &str, name: &str, work: &Path) -> PathBuf {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["plugin", "new", name, "--kind", kind, "--dir"])
        .arg(work)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let crate_dir = work.join(name);
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    std::fs::copy(workspace.join("Cargo.lock"), crate_dir.join("Cargo.lock")).unwrap();

    let target_dir = PathBuf::from(env!("FERROTUNE_PLUGIN_TARGET_DIR"));
    // Output captured, shown only when a step fails (the inner test summary would otherwise
    // read like this test binary's own).
    let cargo = |args: &[&str]| {
        let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(args)
            .arg("--target-dir")
            .arg(&target_dir)
            .current_dir(&crate_dir)
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cargo {} in the {name} scaffold failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    cargo(&["test"]);
    cargo(&["build", "--release", "--target", "wasm32-wasip2"]);
    target_dir.join(format!(
        "wasm32-wasip2/release/{}.wasm",
        name.replace('-', "_")
    ))
}
