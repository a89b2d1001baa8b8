#!/usr/bin/env bash
# Session 19 call 6: 8B QLoRA + "unsloth" checkpointing at batch 1 x 32768 side by side with
# Unsloth (session 18 call 6: 5.479 against 5.037 s per step), with call 4's build (gpu-bin/s19c:
# the backward's dQ from the registers) and, for the A/B, the previous attention.cu swapped in
# (FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s19c/v_base).
# Run from the repository root: bash scripts/gpu/calls/s19-call6.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s19c ferrotune
model llama3-8b
echo "== Unsloth 8B QLoRA 1 x 32768 $(date +%T)"
STEPS=3 timeout 240 bash .bench/run_anchor.sh llama3-8b 1 32768 unsloth-4bit-ckpt 2>&1 | grep -E "^RESULT|failed|Error" | head -5
for v in new v_base; do
  echo "== ferrotune ($v) 8B QLoRA 1 x 32768 $(date +%T)"
  if [ $v = new ]; then unset FERROTUNE_KERNEL_SOURCE_DIR; else export FERROTUNE_KERNEL_SOURCE_DIR=$PWD/gpu-bin/s19c/v_base; fi
  timeout 200 /tmp/ferrotune bench --model_name /tmp/model-llama3-8b --per_device_train_batch_size 1 \
    --max_seq_length 32768 --use_gradient_checkpointing unsloth --load_in_4bit --device cuda \
    --warmup_steps 1 --steps 3 2>&1 | grep -E "RESULT|offload|error"
done
echo "done $(date +%T)"
