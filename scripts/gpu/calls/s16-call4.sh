#!/usr/bin/env bash
# Session 16 call 4: the final build (lora_tdb kept, two stages) — parity, the ladder, and
# Llama-3-8B side by side with Unsloth (anchor benchmark's three modes, then ours twice per mode).
set -uo pipefail
out=${OUT:-/tmp}
# Run from the repository root: bash scripts/gpu/calls/s16-call4.sh (binaries in gpu-bin/s16/, built as docs/gpu.md says).
python3 - <<'PY'
import lzma, os
for n in ("ferrotune", "parity", "cuda_parity"):
    open(f"/tmp/{n}", "wb").write(lzma.open(f"gpu-bin/s16/{n}.xz").read()); os.chmod(f"/tmp/{n}", 0o755)
PY
mkdir -p gpu-bin && for n in ferrotune parity cuda_parity; do ln -sf /tmp/$n gpu-bin/$n; done
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:$(python3 -c 'import os,nvidia; print(":".join(os.path.join(d,"cu13","lib") for d in nvidia.__path__))')"
export FERROTUNE_CACHE_DIR=/tmp/ftcache NO_COLOR=1 RUST_BACKTRACE=1
echo "== parity $(date +%T)"
timeout 120 /tmp/parity > $out/parity.log 2>&1; echo "exit $?"
grep -E "^(ok|FAIL) " $out/parity.log | awk '{print $1}' | sort | uniq -c
grep -E "^FAIL|checks, [0-9]+ failed|panicked|ptxas swiglu/lora" $out/parity.log | head
echo "== ladder $(date +%T)"
PARITY=1 timeout 200 bash scripts/gpu/cuda_checks.sh 2>&1 | grep -E "test result|PASS|FAIL|panicked" | tail -10
echo "== Unsloth $(date +%T)"
timeout 330 bash .bench/run_anchor.sh llama3-8b 2 2048 unsloth unsloth-ckpt unsloth-4bit-ckpt 2>&1 | grep -E "^RESULT|Error|error" | head -10
run() {  # ckpt [extra flags]
  echo "-- ferrotune $1 ${2:-} $(date +%T)"
  timeout 150 /tmp/ferrotune bench --model_name /tmp/model-llama3-8b --per_device_train_batch_size 2 \
    --max_seq_length 2048 --use_gradient_checkpointing $1 ${2:-} --device cuda 2>&1 | grep RESULT
}
for i in 1 2; do run false; run unsloth; run unsloth --load_in_4bit; done
echo "done $(date +%T)"
