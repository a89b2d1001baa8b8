#!/usr/bin/env bash
# Session 21 call 2: the build with the backward's products waited for one group at a time
# (gpu-bin/s21: v_split2 = call 1's v_split with every dQ pass issued before dK) against HEAD's
# kernels (gpu-bin/s20d, "old"):
# 1. parity (every kernel check) and the ladder (engine vs CPU engine, HF+PEFT parity)
# 2. bench-attn: old / new / v_split (call 1's, swapped in as source), two rounds
# 3. 8B QLoRA + "unsloth" at batch 1 x 32768: Unsloth, then ours new and old
# Run from the repository root: bash scripts/gpu/calls/s21-call2.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s20d ferrotune parity
for n in ferrotune parity; do mv /tmp/$n /tmp/old-$n; done
unpack s21 ferrotune parity cuda_parity
echo "== parity $(date +%T)"
timeout 120 /tmp/parity > $out/parity.log 2>&1; echo "exit $?"
grep -E "^(ok|FAIL) " $out/parity.log | awk '{print $1}' | sort | uniq -c
grep -E "ptxas attention/flash_bwd_d(64|128)_sm90|^FAIL|panicked" $out/parity.log | head -8
echo "== ladder $(date +%T)"
PARITY=1 timeout 150 bash scripts/gpu/cuda_checks.sh 2>&1 | grep -E "test result|PASS|FAIL|panicked" | tail -10
for round in 1 2; do
  for v in old new v_split; do
    echo "== bench-attn $v $(date +%T)"
    unset FERROTUNE_KERNEL_SOURCE_DIR; bin=/tmp/parity
    case $v in old) bin=/tmp/old-parity;; v_*) export FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s21/$v;; esac
    timeout 150 $bin --skip-checks --bench-attn 2>&1 | grep -E "^bench-attn .*bwd|rror|panicked" | sed -E 's/ +/ /g'
  done
done
unset FERROTUNE_KERNEL_SOURCE_DIR
model llama3-8b
echo "== Unsloth 8B QLoRA 1 x 32768 $(date +%T)"
STEPS=3 timeout 240 bash .bench/run_anchor.sh llama3-8b 1 32768 unsloth-4bit-ckpt 2>&1 | grep -E "^RESULT|failed|Error" | head -5
for bin in ferrotune old-ferrotune; do
  echo "== $bin 8B QLoRA 1 x 32768 $(date +%T)"
  timeout 100 /tmp/$bin bench --model_name /tmp/model-llama3-8b --per_device_train_batch_size 1 \
    --max_seq_length 32768 --use_gradient_checkpointing unsloth --load_in_4bit --device cuda \
    --warmup_steps 1 --steps 3 2>&1 | grep -E "RESULT|error"
done
echo "done $(date +%T)"
