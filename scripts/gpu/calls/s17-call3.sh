#!/usr/bin/env bash
# Session 17 call 3: every issue-7 target side by side with Unsloth in one call, HEAD's build —
# the anchor benchmark's three 8B modes then ours twice per mode; its two 1B modes then ours
# twice per mode; last, Unsloth's 1B modes once more (its 1B readings move by up to ±25%
# between calls: a second reading in the same call shows how much within one).
# Run from the repository root: bash scripts/gpu/calls/s17-call3.sh (binaries in gpu-bin/s17/).
set -uo pipefail
python3 -c "
import lzma, os
open('/tmp/ferrotune','wb').write(lzma.open('gpu-bin/s17/ferrotune.xz').read()); os.chmod('/tmp/ferrotune',0o755)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:$(python3 -c 'import os,nvidia; print(":".join(os.path.join(d,"cu13","lib") for d in nvidia.__path__))')"
export FERROTUNE_CACHE_DIR=/tmp/ftcache NO_COLOR=1 RUST_BACKTRACE=1
run() {  # shape ckpt [extra flags]
  echo "-- ferrotune $1 $2 ${3:-} $(date +%T)"
  timeout 150 /tmp/ferrotune bench --model_name /tmp/model-$1 --per_device_train_batch_size 2 \
    --max_seq_length 2048 --use_gradient_checkpointing $2 ${3:-} --device cuda 2>&1 | grep RESULT
}
echo "== Unsloth 8B $(date +%T)"
timeout 330 bash .bench/run_anchor.sh llama3-8b 2 2048 unsloth unsloth-ckpt unsloth-4bit-ckpt 2>&1 | grep -E "^RESULT|Error|error" | head -10
for i in 1 2; do run llama3-8b false; run llama3-8b unsloth; run llama3-8b unsloth --load_in_4bit; done
echo "== Unsloth 1B $(date +%T)"
timeout 200 bash .bench/run_anchor.sh llama3-1b 2 2048 unsloth unsloth-ckpt 2>&1 | grep -E "^RESULT|Error|error" | head -10
for i in 1 2; do run llama3-1b false; run llama3-1b unsloth; done
echo "== Unsloth 1B, second reading $(date +%T)"
timeout 150 bash .bench/run_anchor.sh llama3-1b 2 2048 unsloth unsloth-ckpt 2>&1 | grep -E "^RESULT|Error|error" | head -10
echo "done $(date +%T)"
