#!/usr/bin/env bash
# Session 15 call 2: the warp-specialised backward with two tensor-core drains per item
# (v_merged: dV, dK and dQ's first half issued as one group) against call 1's kernels, kernel
# level (parity checks + bench for each source variant), then end to end with v_merged.
set -uo pipefail
out=${OUT:-/tmp}
# Run from the repository root: bash scripts/gpu/calls/s15-call2.sh (binaries in gpu-bin/s15/, built as docs/gpu.md says).
python3 - <<'PY'
import lzma, os
for n in ("ferrotune", "parity"):
    open(f"/tmp/{n}", "wb").write(lzma.open(f"gpu-bin/s15/{n}.xz").read()); os.chmod(f"/tmp/{n}", 0o755)
PY
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:$(python3 -c 'import os,nvidia; print(":".join(os.path.join(d,"cu13","lib") for d in nvidia.__path__))')"
export FERROTUNE_CACHE_DIR=/tmp/ftcache NO_COLOR=1 RUST_BACKTRACE=1
for v in embedded gpu-bin/s15/v_merged/ gpu-bin/s15/v_lockstep/ gpu-bin/s15/v_merged/; do
  echo "== parity, source $v $(date +%T)"
  if [ $v = embedded ]; then src=""; else src=$v; fi
  FERROTUNE_KERNEL_SOURCE_DIR=$src timeout 200 /tmp/parity --attn-only --bench-attn > $out/flash_parity-$(basename $v).log 2>&1
  echo "exit $?"
  grep -E "^FAIL|checks, [0-9]+ failed|^bench-attn|panicked|rror" $out/flash_parity-$(basename $v).log | sed 's/(CUDA.*//' | head -12
done
for shape in llama3-8b llama3-1b; do
  d=/tmp/model-$shape
  [ -f $d/config.json ] || python3 .bench/make_model.py $shape $d 2>&1 | tail -1
done
run() {  # kernel shape ckpt
  echo "-- $1 $2 $3 $(date +%T)"
  FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s15/v_merged/ FERROTUNE_FLASH_BWD=$1 timeout 150 /tmp/ferrotune bench --model_name /tmp/model-$2 --per_device_train_batch_size 2 \
    --max_seq_length 2048 --use_gradient_checkpointing $3 --device cuda > $out/bench-$1-$2-$3-$(date +%s).log 2>&1
  grep -h RESULT $out/bench-$1-$2-$3-*.log | tail -1 | grep -oE '"(tokens_per_s|step_s_median|peak_gib)":[0-9.]+|"losses":\[[^]]*\]' | tr '\n' ' '; echo
}
for i in 1 2; do
  for k in warpgroup specialized; do run $k llama3-8b false; done
  for k in specialized warpgroup; do run $k llama3-8b unsloth; done
  for k in warpgroup specialized; do run $k llama3-1b false; done
done
echo "done $(date +%T)"
