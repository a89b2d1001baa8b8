#!/usr/bin/env bash
# Runs every test of the workspace. Used by CI (.ci/run) and by the README.
set -euo pipefail
cd "$(dirname "$0")/.."
# ferrotune/cuda compiles the cuda engine and, through it, ferrotune-kernels/cuda (cudarc loads
# CUDA dynamically, so no toolkit is needed): one workspace build with one feature set runs the
# engine's non-GPU tests, the NVRTC compile test and the GPU tests (which skip without a GPU).
cargo test --workspace --no-fail-fast --features ferrotune/cuda
