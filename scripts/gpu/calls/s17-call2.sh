#!/usr/bin/env bash
# Session 17 call 2: the split cuda engine (a963f8e; methods moved unchanged) verified — the
# ladder with HF+PEFT parity, checkpoints across engines, then end to end against session 16's
# build (08bad26), one of each in turn: 8B without checkpointing, "unsloth", QLoRA; 1B both modes.
# Run from the repository root: bash scripts/gpu/calls/s17-call2.sh (binaries in gpu-bin/s17/).
set -uo pipefail
out=${OUT:-/tmp}
python3 - <<'PY'
import lzma, os
for n, src in (("ferrotune", "s17/ferrotune"), ("cuda_parity", "s17/cuda_parity"),
               ("ferrotune-prev", "s16/ferrotune")):
    open(f"/tmp/{n}", "wb").write(lzma.open(f"gpu-bin/{src}.xz").read()); os.chmod(f"/tmp/{n}", 0o755)
PY
mkdir -p gpu-bin && for n in ferrotune cuda_parity; do ln -sf /tmp/$n gpu-bin/$n; done
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:$(python3 -c 'import os,nvidia; print(":".join(os.path.join(d,"cu13","lib") for d in nvidia.__path__))')"
export FERROTUNE_CACHE_DIR=/tmp/ftcache NO_COLOR=1 RUST_BACKTRACE=1
echo "== ladder $(date +%T)"
PARITY=1 timeout 240 bash scripts/gpu/cuda_checks.sh 2>&1 | grep -E "test result|PASS|FAIL|panicked" | tail -10
echo "== resume across engines $(date +%T)"
timeout 120 bash scripts/gpu/resume_across_engines.sh 2>&1 | tail -6
for shape in llama3-8b llama3-1b; do
  d=/tmp/model-$shape
  [ -f $d/config.json ] || python3 .bench/make_model.py $shape $d 2>&1 | tail -1
done
run() {  # binary shape ckpt [extra flags]
  echo "-- $1 $2 $3 ${4:-} $(date +%T)"
  timeout 150 /tmp/$1 bench --model_name /tmp/model-$2 --per_device_train_batch_size 2 \
    --max_seq_length 2048 --use_gradient_checkpointing $3 ${4:-} --device cuda 2>&1 | grep RESULT \
    | grep -oE '"(tokens_per_s|step_s_median|peak_gib|first_step_done_s)":[0-9.]+|"losses":\[[^]]*\]' | tr '\n' ' '; echo
}
for pair in "ferrotune-prev ferrotune"; do
  for b in $pair; do run $b llama3-8b false; done
  for b in $pair; do run $b llama3-8b unsloth; done
  for b in $pair; do run $b llama3-8b unsloth --load_in_4bit; done
  for b in $pair; do run $b llama3-1b false; done
  for b in $pair; do run $b llama3-1b unsloth; done
done
echo "done $(date +%T)"
