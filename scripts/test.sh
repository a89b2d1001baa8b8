#!/usr/bin/env bash
# Runs every test of the workspace. Used by CI (.ci/run) and by the README.
set -euo pipefail
cd "$(dirname "$0")/.."
# ferrotune/cuda compiles the cuda engine and, through it, ferrotune-kernels/cuda (cudarc loads
# CUDA dynamically, so no toolkit is needed): one workspace build with one feature set runs the
# engine's non-GPU tests, the NVRTC compile test and the GPU tests (which skip without a GPU).
cargo test --workspace --no-fail-fast --features ferrotune/cuda
# The attention kernels' source run on the CPU (one thread per CUDA thread) against an f64
# reference: index math, masks, the dQ lane exchange (docs/kernels.md; g++ >= 12).
bash kernels/sim/run.sh
