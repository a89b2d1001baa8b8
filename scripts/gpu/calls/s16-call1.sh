#!/usr/bin/env bash
# Session 16 call 1: one adapter's t and dB in one pass over dy (lora_tdb) for o, down, q, k, v.
# 1. parity --bench: every kernel checked (lora_tdb: 4 shapes), kernels timed.
# 2. end to end, new build against session 15's (gpu-bin/s15/ferrotune.xz, same engine
#    otherwise), alternating: 8B no checkpointing and "unsloth", 1B no checkpointing.
# 3. the ladder (cuda_parity + HF parity) on the new build.
set -uo pipefail
out=${OUT:-/tmp}
# Run from the repository root: bash scripts/gpu/calls/s16-call1.sh (binaries in gpu-bin/s16/, built as docs/gpu.md says).
python3 - <<'PY'
import lzma, os
for n, src in (("ferrotune", "s16/ferrotune"), ("parity", "s16/parity"),
               ("cuda_parity", "s16/cuda_parity"), ("ferrotune-prev", "s15/ferrotune")):
    open(f"/tmp/{n}", "wb").write(lzma.open(f"gpu-bin/{src}.xz").read()); os.chmod(f"/tmp/{n}", 0o755)
PY
mkdir -p gpu-bin && for n in ferrotune parity cuda_parity; do ln -sf /tmp/$n gpu-bin/$n; done
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:$(python3 -c 'import os,nvidia; print(":".join(os.path.join(d,"cu13","lib") for d in nvidia.__path__))')"
export FERROTUNE_CACHE_DIR=/tmp/ftcache NO_COLOR=1 RUST_BACKTRACE=1
echo "== parity $(date +%T)"
timeout 300 /tmp/parity --bench > $out/parity.log 2>&1
rc=$?
grep -E "^(ok|FAIL) " $out/parity.log | awk '{print $1}' | sort | uniq -c
grep -E "lora_tdb|swiglu_lora" $out/parity.log | grep -E "^(ok|FAIL)" | head -20
grep -E "^FAIL|checks, [0-9]+ failed|^bench |panicked|rror|ptxas swiglu" $out/parity.log | head -60
echo "parity exit $rc $(date +%T)"
[ $rc -ne 0 ] && exit 1
for shape in llama3-8b llama3.2-1b; do
  d=/tmp/model-$shape
  [ -f $d/config.json ] || python3 .bench/make_model.py $shape $d 2>&1 | tail -1
done
run() {  # binary shape ckpt
  echo "-- $1 $2 $3 $(date +%T)"
  timeout 150 /tmp/$1 bench --model_name /tmp/model-$2 --per_device_train_batch_size 2 \
    --max_seq_length 2048 --use_gradient_checkpointing $3 --device cuda > $out/bench-$1-$2-$3-$(date +%s).log 2>&1
  grep -h RESULT $out/bench-$1-$2-$3-*.log | tail -1 | grep -oE '"(tokens_per_s|step_s_median|peak_gib)":[0-9.]+|"losses":\[[^]]*\]' | tr '\n' ' '; echo
}
for i in 1 2; do
  for b in ferrotune-prev ferrotune; do run $b llama3-8b false; done
  for b in ferrotune ferrotune-prev; do run $b llama3-8b unsloth; done
  for b in ferrotune-prev ferrotune; do run $b llama3.2-1b false; done
done
echo "== ladder $(date +%T)"
PARITY=1 timeout 200 bash scripts/gpu/cuda_checks.sh 2>&1 | grep -E "test result|PASS|FAIL|panicked|^test " | tail -30
echo "done $(date +%T)"
