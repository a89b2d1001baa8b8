#!/usr/bin/env bash
# Builds and runs the CPU simulator of kernels/cuda/attention.cu (see attention_sim.cpp).
# Usage: kernels/sim/run.sh   (from anywhere; needs g++ with C++20). Exit status 1 on a mismatch.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
# CTAs run one at a time, so `__shared__` becomes `static`; the dynamic shared array is a global.
sed 's/extern __shared__/extern/' "$here/../cuda/attention.cu" > "$build/attention_sim_src.cu"
# Twice: the scalar dQ atomics (sm_80..89) and sm_90's 16-byte reductions (FA_RED_V4).
for variant in "" "-DFA_RED_V4"; do
  echo "== attention_sim ${variant:-(scalar dQ atomics)}"
  g++ -std=c++20 -O2 -pthread -fno-strict-aliasing -Wno-unknown-pragmas $variant -I"$build" \
      "$here/attention_sim.cpp" -o "$build/attention_sim"
  "$build/attention_sim"
done
