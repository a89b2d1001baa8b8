// Included by `host/build.rs` as well as compiled into the crate: keep it dependency-free.

/// `[profile.release]` settings for plugin components: small (`opt-level = "s"`, fat LTO, one
/// codegen unit) and `panic = "abort"` (wasm has no unwinding). `build.rs` passes them to the
/// built-ins' build as `CARGO_PROFILE_RELEASE_*` variables and `ferrotune plugin new` writes
/// them into a scaffold's Cargo.toml, so both builds compile shared dependencies identically
/// and can reuse each other's artefacts in one target directory.
pub const WASM_RELEASE_PROFILE: [(&str, &str); 5] = [
    ("opt-level", "\"s\""),
    ("lto", "true"),
    ("codegen-units", "1"),
    ("panic", "\"abort\""),
    ("strip", "true"),
];

/// The same settings as `CARGO_PROFILE_RELEASE_*` environment variables.
pub fn wasm_release_profile_env() -> Vec<(String, String)> {
    WASM_RELEASE_PROFILE
        .iter()
        .map(|(key, value)| {
            (
                format!(
                    "CARGO_PROFILE_RELEASE_{}",
                    key.replace('-', "_").to_uppercase()
                ),
                value.trim_matches('"').to_string(),
            )
        })
        .collect()
}
