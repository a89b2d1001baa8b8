#!/usr/bin/env bash
# The fused attention kernels on the GPU machine, from the repo root, with binaries built here:
#   gpu-bin/parity       CARGO_TARGET_DIR=/work/target-kernels cargo build --profile gpu \
#                          -p ferrotune-kernels --features cuda --example parity
#                        (then cp /work/target-kernels/gpu/examples/parity gpu-bin/)
#   gpu-bin/cuda_parity_flash (optional) the whole-step parity test binary of the same commit
#                        (cargo test --profile gpu -p ferrotune --features cuda --test cuda_parity --no-run)
# 1. kernel parity: every attention check of `parity --attn-only` (O, lse, dQ, dK, dV against the
#    f64 reference; 7 shapes) — one summary line per check, then the failures in full;
# 2. `--bench-attn`: forward/backward ms and TFLOP/s at Llama-3-8B and Llama-3.2-1B shapes;
# 3. if present, the whole training step (loss + every LoRA gradient) vs the cpu engine.
# Full logs go to $OUT (or /tmp). Exit status: non-zero if any check failed.
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
echo "parity exit $rc"

if [ -x ./gpu-bin/cuda_parity_flash ]; then
  FERROTUNE_REQUIRE_GPU=1 ./gpu-bin/cuda_parity_flash --nocapture --test-threads 1 > "$out/flash_step_parity.log" 2>&1
  rc=$?
  [ $rc -ne 0 ] && status=1
  grep -E "^test |rel|max|FAIL|panicked|test result" "$out/flash_step_parity.log" | grep -vE "^\s+(at|[0-9]+:) " | tail -40
  echo "cuda_parity exit $rc"
fi
exit $status
