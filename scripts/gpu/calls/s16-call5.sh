#!/usr/bin/env bash
# Session 16 call 5: Llama-3.2-1B side by side with Unsloth (the anchor benchmark's two modes,
# then ours twice per mode), the final build.
set -uo pipefail
# Run from the repository root: bash scripts/gpu/calls/s16-call5.sh (binaries in gpu-bin/s16/, built as docs/gpu.md says).
python3 -c "
import lzma, os
open('/tmp/ferrotune','wb').write(lzma.open('gpu-bin/s16/ferrotune.xz').read()); os.chmod('/tmp/ferrotune',0o755)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:$(python3 -c 'import os,nvidia; print(":".join(os.path.join(d,"cu13","lib") for d in nvidia.__path__))')"
export FERROTUNE_CACHE_DIR=/tmp/ftcache NO_COLOR=1 RUST_BACKTRACE=1
echo "== Unsloth $(date +%T)"
timeout 300 bash .bench/run_anchor.sh llama3-1b 2 2048 unsloth unsloth-ckpt 2>&1 | grep -E "^RESULT|Error|error" | head -10
for i in 1 2; do for c in false unsloth; do
  echo "-- ferrotune $c $(date +%T)"
  timeout 100 /tmp/ferrotune bench --model_name /tmp/model-llama3-1b --per_device_train_batch_size 2 \
    --max_seq_length 2048 --use_gradient_checkpointing $c --device cuda 2>&1 | grep RESULT
done; done
echo "done $(date +%T)"
