#!/usr/bin/env bash
# Session 18 call 6: 8B QLoRA + "unsloth" checkpointing at batch 1 x 32768 side by side with
# Unsloth (last measured in session 10: 5.43 against 4.98 s per step), HEAD's kernels
# (gpu-bin/s18b: the build of call 4).
# Run from the repository root: bash scripts/gpu/calls/s18-call6.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s18b ferrotune
model llama3-8b
echo "== Unsloth 8B QLoRA 1 x 32768 $(date +%T)"
STEPS=3 timeout 240 bash .bench/run_anchor.sh llama3-8b 1 32768 unsloth-4bit-ckpt 2>&1 | grep -E "^RESULT|failed|Error" | head -5
echo "== ferrotune 8B QLoRA 1 x 32768 $(date +%T)"
timeout 240 /tmp/ferrotune bench --model_name /tmp/model-llama3-8b --per_device_train_batch_size 1 \
  --max_seq_length 32768 --use_gradient_checkpointing unsloth --load_in_4bit --device cuda \
  --warmup_steps 1 --steps 3 2>&1 | grep -E "RESULT|offload|error"
echo "done $(date +%T)"
