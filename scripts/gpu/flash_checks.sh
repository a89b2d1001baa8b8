#!/usr/bin/env bash
# The fused attention kernels on the GPU machine, from the repo root, with binaries built here:
#   gpu-bin/parity       CARGO_TARGET_DIR=/work/target-kernels cargo build --profile gpu \
#                          -p ferrotune-kernels --features cuda --example parity
#                        (then cp /work/target-kernels/gpu/examples/parity gpu-bin/)
# 1. kernel parity: every attention check of `parity --attn-only` (segment block classes exact;
#    O, dQ, dK, dV within 1e-2 and lse within 1e-4 rel. L2 of the f64 reference; 7 shapes) —
#    one line per check;
# 2. `--bench-attn`: forward/backward ms and TFLOP/s at Llama-3-8B and Llama-3.2-1B shapes.
# The whole training step through the fused attention is ladder step 2 (cuda_checks.sh,
# tests/cuda_parity.rs). Full log in $OUT (or /tmp). Exit status non-zero if a check failed.
set -uo pipefail
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:$(python3 -c 'import os,nvidia; print(":".join(os.path.join(d,"cu13","lib") for d in nvidia.__path__))')"
export FERROTUNE_CACHE_DIR=/tmp/ftcache RUST_BACKTRACE=1
status=0

./gpu-bin/parity --attn-only --bench-attn > "$out/flash_parity.log" 2>&1
rc=$?
[ $rc -ne 0 ] && status=1
# Load report (compile time, registers), one line per check, the summary and the benchmark.
grep -E "^(device|ptxas attention)" "$out/flash_parity.log"
grep -E "^(ok|FAIL) " "$out/flash_parity.log"
grep -E "checks, [0-9]+ failed|^bench-attn|panicked|Error|error" "$out/flash_parity.log"
# Failures again at the end, so a tail of this output shows them next to the summary.
grep -E "^FAIL " "$out/flash_parity.log" | sed 's/^/again: /'
echo "parity exit $rc"

exit $status
