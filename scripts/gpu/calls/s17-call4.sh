#!/usr/bin/env bash
# Session 17 call 4: HEAD 84fe429 (the kernels' launchers and the parity example split into
# modules, nothing changed in what runs) verified — every kernel's parity checks and timings,
# the ladder with HF+PEFT parity, and one end-to-end run per 8B mode and 1B mode.
# Run from the repository root: bash scripts/gpu/calls/s17-call4.sh (binaries in gpu-bin/s17b/).
set -uo pipefail
out=${OUT:-/tmp}
python3 - <<'PY'
import lzma, os
for n in ("ferrotune", "parity", "cuda_parity"):
    open(f"/tmp/{n}", "wb").write(lzma.open(f"gpu-bin/s17b/{n}.xz").read()); os.chmod(f"/tmp/{n}", 0o755)
PY
mkdir -p gpu-bin && for n in ferrotune parity cuda_parity; do ln -sf /tmp/$n gpu-bin/$n; done
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:$(python3 -c 'import os,nvidia; print(":".join(os.path.join(d,"cu13","lib") for d in nvidia.__path__))')"
export FERROTUNE_CACHE_DIR=/tmp/ftcache NO_COLOR=1 RUST_BACKTRACE=1
echo "== parity --bench $(date +%T)"
timeout 150 /tmp/parity --bench > $out/parity.log 2>&1; echo "exit $?"
grep -E "^(ok|FAIL) " $out/parity.log | awk '{print $1}' | sort | uniq -c
grep -E "^FAIL|checks, [0-9]+ failed|panicked|^bench " $out/parity.log | head -30
echo "== ladder $(date +%T)"
PARITY=1 timeout 240 bash scripts/gpu/cuda_checks.sh 2>&1 | grep -E "test result|PASS|FAIL|panicked" | tail -10
for shape in llama3-8b llama3-1b; do
  d=/tmp/model-$shape
  [ -f $d/config.json ] || python3 .bench/make_model.py $shape $d 2>&1 | tail -1
done
for m in "llama3-8b false" "llama3-8b unsloth" "llama3-8b unsloth --load_in_4bit" "llama3-1b false" "llama3-1b unsloth"; do
  set -- $m
  echo "-- $* $(date +%T)"
  timeout 120 /tmp/ferrotune bench --model_name /tmp/model-$1 --per_device_train_batch_size 2 \
    --max_seq_length 2048 --use_gradient_checkpointing $2 ${3:-} --device cuda 2>&1 | grep RESULT \
    | grep -oE '"(tokens_per_s|step_s_median|peak_gib)":[0-9.]+|"losses":\[[^]]*\]' | tr '\n' ' '; echo
done
echo "done $(date +%T)"
