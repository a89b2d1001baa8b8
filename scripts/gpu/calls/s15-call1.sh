#!/usr/bin/env bash
# Session 15 call 1: the warp-specialised attention backward.
# 1. parity --attn-only --bench-attn: every backward kernel checked (7 shapes) and timed.
# 2. end to end, one binary: FERROTUNE_FLASH_BWD=warpgroup (session 14's kernel) against the
#    default (specialized), alternating; 8B no checkpointing and "unsloth", 1B no checkpointing.
# 3. the ladder (cuda_parity + HF parity) on the new default.
set -uo pipefail
out=${OUT:-/tmp}
# Run from the repository root: bash scripts/gpu/calls/s15-call1.sh (binaries in gpu-bin/s15/, built as docs/gpu.md says).
python3 - <<'PY'
import lzma, os, stat
for n in ("ferrotune", "parity", "cuda_parity"):
    src = f"gpu-bin/s15/{n}.xz"
    if os.path.exists(src):
        open(f"/tmp/{n}", "wb").write(lzma.open(src).read())
        os.chmod(f"/tmp/{n}", 0o755)
PY
mkdir -p gpu-bin && for n in ferrotune parity cuda_parity; do ln -sf /tmp/$n gpu-bin/$n; done
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:$(python3 -c 'import os,nvidia; print(":".join(os.path.join(d,"cu13","lib") for d in nvidia.__path__))')"
export FERROTUNE_CACHE_DIR=/tmp/ftcache NO_COLOR=1 RUST_BACKTRACE=1
echo "== parity $(date +%T)"
timeout 240 /tmp/parity --attn-only --bench-attn > $out/flash_parity.log 2>&1
rc=$?
grep -E "^(ok|FAIL) .*flash_bwd" $out/flash_parity.log | awk '{print $1}' | sort | uniq -c
grep -E "^FAIL|checks, [0-9]+ failed|^bench-attn|panicked|rror" $out/flash_parity.log | head -40
echo "parity exit $rc $(date +%T)"
for v in gpu-bin/s15/v_*/; do
  echo "== parity, source variant $v $(date +%T)"
  FERROTUNE_KERNEL_SOURCE_DIR=$v timeout 240 /tmp/parity --attn-only --bench-attn > $out/flash_parity-$(basename $v).log 2>&1
  echo "exit $?"
  grep -E "^FAIL|checks, [0-9]+ failed|^bench-attn|panicked|rror" $out/flash_parity-$(basename $v).log | head -20
done
[ $rc -ne 0 ] && exit 1
for shape in llama3-8b llama3.2-1b; do
  d=/tmp/model-$shape
  [ -f $d/config.json ] || python3 .bench/make_model.py $shape $d 2>&1 | tail -1
done
run() {  # kernel shape ckpt
  echo "-- $1 $2 $3 $(date +%T)"
  FERROTUNE_FLASH_BWD=$1 timeout 150 /tmp/ferrotune bench --model_name /tmp/model-$2 --per_device_train_batch_size 2 \
    --max_seq_length 2048 --use_gradient_checkpointing $3 --device cuda > $out/bench-$1-$2-$3-$(date +%s).log 2>&1
  grep -h RESULT $out/bench-$1-$2-$3-*.log | tail -1 | grep -oE '"(tokens_per_s|step_s_median|peak_gib)":[0-9.]+|"losses":\[[^]]*\]' | tr '\n' ' '; echo
}
for i in 1 2; do
  for k in warpgroup specialized; do run $k llama3-8b false; done
  for k in specialized warpgroup; do run $k llama3-8b unsloth; done
  for k in warpgroup specialized; do run $k llama3.2-1b false; done
done
echo "== ladder $(date +%T)"
PARITY=1 timeout 200 bash scripts/gpu/cuda_checks.sh 2>&1 | grep -E "test result|PASS|FAIL|panicked|^test " | tail -30
echo "done $(date +%T)"
