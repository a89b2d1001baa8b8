#!/usr/bin/env bash
# Runs every test of the workspace. Used by CI (.ci/run) and by the README.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --no-fail-fast
