#!/usr/bin/env bash
# Session 23 call 3: issue 7's long-sequence row on HEAD's build (gpu-bin/s23): 8B QLoRA +
# "unsloth" checkpointing at batch 1 × 8k / 16k / 32k, Unsloth then ours at each length, both
# 3 warm-up + 3 timed steps (median), peak allocated memory on both sides. The 8k/16k figures
# were last measured in session 5, before most of today's engine.
# Run from the repository root: bash scripts/gpu/calls/s23-call3.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s23 ferrotune
model llama3-8b
for t in 8192 16384 32768; do
  echo "== Unsloth 8B QLoRA 1 x $t $(date +%T)"
  STEPS=3 timeout 150 bash .bench/run_anchor.sh llama3-8b 1 $t unsloth-4bit-ckpt 2>&1 | grep -E "^RESULT|failed"
  echo "-- ferrotune 8B QLoRA 1 x $t $(date +%T)"
  timeout 120 /tmp/ferrotune bench --model_name /tmp/model-llama3-8b --per_device_train_batch_size 1 \
    --max_seq_length $t --use_gradient_checkpointing unsloth --load_in_4bit --device cuda \
    --warmup_steps 3 --steps 3 2>&1 | grep -E "RESULT|rror"
done
echo "done $(date +%T)"
