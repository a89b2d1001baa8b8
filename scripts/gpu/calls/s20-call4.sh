#!/usr/bin/env bash
# Session 20 call 4: every issue-7 target side by side with Unsloth in one call, HEAD's build
# (gpu-bin/s20d: the attention tiles loaded by TMA, perf-notes §33) — as session 17's call 3: the
# anchor benchmark's three 8B modes then ours twice per mode; its two 1B modes then ours twice
# per mode; last, Unsloth's 1B modes once more (its 1B readings move by up to ±25% between
# calls: a second reading in the same call shows how much within one).
# Run from the repository root: bash scripts/gpu/calls/s20-call4.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s20d ferrotune
run() {  # shape ckpt [extra flags]: the whole RESULT line
  echo "-- ferrotune $* $(date +%T)"
  timeout 150 /tmp/ferrotune bench --model_name "/tmp/model-$1" --per_device_train_batch_size 2 \
    --max_seq_length 2048 --use_gradient_checkpointing "$2" "${@:3}" --device cuda 2>&1 | grep RESULT
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
