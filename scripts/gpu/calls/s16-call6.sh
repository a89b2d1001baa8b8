#!/usr/bin/env bash
# Session 16 call 6: HEAD (08bad26: the kept kernel with its launch configuration shared by both
# variants) — parity, the ladder, one end-to-end run per 8B mode and 1B.
set -uo pipefail
out=${OUT:-/tmp}
# Run from the repository root: bash scripts/gpu/calls/s16-call6.sh (binaries in gpu-bin/s16/, built as docs/gpu.md says).
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
echo "== parity, source variant v_item (items outer, sub-blocks unrolled, no divisions) $(date +%T)"
FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s16/v_item timeout 120 /tmp/parity --bench > $out/parity-v_item.log 2>&1; echo "exit $?"
grep -E "^(ok|FAIL) " $out/parity-v_item.log | awk '{print $1}' | sort | uniq -c
grep -E "^FAIL|checks, [0-9]+ failed|panicked|ptxas swiglu/|^bench (lora|swiglu)" $out/parity-v_item.log | head -20
echo "== parity, source variant v_nodiv (one body, coordinates counted instead of divided) $(date +%T)"
FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s16/v_nodiv timeout 120 /tmp/parity --bench > $out/parity-v_nodiv.log 2>&1; echo "exit $?"
grep -E "^(ok|FAIL) " $out/parity-v_nodiv.log | awk '{print $1}' | sort | uniq -c
grep -E "^FAIL|checks, [0-9]+ failed|panicked|^bench (lora|swiglu)" $out/parity-v_nodiv.log | head -20
echo "== parity --skip-checks --bench, build's source $(date +%T)"
timeout 60 /tmp/parity --skip-checks --bench 2>&1 | grep -E "^bench (lora|swiglu)"
echo "== ladder $(date +%T)"
PARITY=1 timeout 200 bash scripts/gpu/cuda_checks.sh 2>&1 | grep -E "test result|PASS|FAIL|panicked" | tail -10
for shape in llama3-8b llama3-1b; do
  d=/tmp/model-$shape
  [ -f $d/config.json ] || python3 .bench/make_model.py $shape $d 2>&1 | tail -1
done
for m in "llama3-8b false" "llama3-8b unsloth" "llama3-1b false"; do
  set -- $m
  echo "-- $1 $2 $(date +%T)"
  timeout 120 /tmp/ferrotune bench --model_name /tmp/model-$1 --per_device_train_batch_size 2 \
    --max_seq_length 2048 --use_gradient_checkpointing $2 --device cuda 2>&1 | grep RESULT
done
echo "done $(date +%T)"
