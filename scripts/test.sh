#!/usr/bin/env bash
# Runs every test of the workspace. Used by CI (.ci/run) and by the README.
set -euo pipefail
cd "$(dirname "$0")/.."
# ferrotune-kernels/cuda compiles the GPU code paths (cudarc loads CUDA dynamically, so no
# toolkit is needed) and the NVRTC compile test, in the same single workspace build.
cargo test --workspace --no-fail-fast --features ferrotune-kernels/cuda
