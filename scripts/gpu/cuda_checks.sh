#!/usr/bin/env bash
# On the GPU machine, from the repo root, with the binaries built here and carried in gpu-bin/:
#   ferrotune   (cargo build --profile gpu -p ferrotune --features cuda)
#   cuda_parity (cargo test --profile gpu -p ferrotune --features cuda --test cuda_parity --no-run)
# The two binaries plus .bench/site.tgz exceed the 64 MiB carry limit: carry ferrotune as
# gpu-bin/ferrotune.xz (xz -6, ~10 MB) and unpack it first with python3's lzma (see docs/gpu.md).
# Runs the correctness ladder (cpu parity, HF+PEFT parity; PARITY=0 skips it) and, with
# BENCH="SHAPE ...", the anchor benchmark (ANCHOR_MODES="hf unsloth ...") and `ferrotune bench`
# (CKPT_MODES, default "false true unsloth") on the same weights in the same call; QUANT="16 4"
# also runs each mode with --load_in_4bit (default "16": 16-bit only).
# Logs go to $OUT (or /tmp).
set -uo pipefail
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:$(python3 -c 'import os,nvidia; print(":".join(os.path.join(d,"cu13","lib") for d in nvidia.__path__))')"
export FERROTUNE_CACHE_DIR=/tmp/ftcache RUST_BACKTRACE=1
if [ "${PARITY:-1}" = 1 ]; then
  FERROTUNE_REQUIRE_GPU=1 FERROTUNE_PARITY_OUT=/tmp/hfbundle ./gpu-bin/cuda_parity --nocapture --test-threads 1 2>&1 | tee $out/cuda_parity.log | grep -vE "^\s+(at|[0-9]+:) "
  PYTHONUNBUFFERED=1 python3 tests/python/hf_parity.py /tmp/hfbundle 2>&1 | tee $out/hf_parity.log | grep -vE "Warning|warn" | tail -8
fi
for shape in ${BENCH:-}; do
  if [ -n "${ANCHOR_MODES:-}" ]; then bash .bench/run_anchor.sh $shape 2 2048 $ANCHOR_MODES; fi
  d=/tmp/model-$shape
  [ -f $d/config.json ] || python3 .bench/make_model.py $shape $d 2>&1 | tail -1
  for q in ${QUANT:-16}; do
    q4=""; [ "$q" = 4 ] && q4="--load_in_4bit"
    for ck in ${CKPT_MODES:-false true unsloth}; do
      timeout 240 ./gpu-bin/ferrotune bench --model_name $d --per_device_train_batch_size 2 --max_seq_length 2048 \
        --use_gradient_checkpointing $ck --device cuda $q4 2>&1 | tee -a $out/bench-$shape.log | grep -E "RESULT|error|panicked"
    done
  done
done
