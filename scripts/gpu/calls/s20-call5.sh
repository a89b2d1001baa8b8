#!/usr/bin/env bash
# Session 20 call 5: correctness of call 4's build (gpu-bin/s20d, the attention tiles loaded by
# TMA): parity (every kernel check), the ladder (engine vs CPU engine, HF+PEFT parity); then 8B
# QLoRA + "unsloth" at batch 1 x 32768 with it and with HEAD's build before the change
# (gpu-bin/s20), for the long-sequence row of issue 7 (Unsloth read 5.070 s per step there in
# session 19's call 6; not re-run: no device time left for it this session).
# Run from the repository root: bash scripts/gpu/calls/s20-call5.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s20 ferrotune
mv /tmp/ferrotune /tmp/old-ferrotune
unpack s20d ferrotune parity cuda_parity
echo "== parity $(date +%T)"
timeout 120 /tmp/parity > $out/parity.log 2>&1; echo "exit $?"
grep -E "^(ok|FAIL) " $out/parity.log | awk '{print $1}' | sort | uniq -c
grep -E "^FAIL|panicked" $out/parity.log | head -5
echo "== ladder $(date +%T)"
PARITY=1 timeout 150 bash scripts/gpu/cuda_checks.sh 2>&1 | grep -E "test result|PASS|FAIL|panicked" | tail -10
model llama3-8b
for bin in ferrotune old-ferrotune; do
  echo "== $bin 8B QLoRA 1 x 32768 $(date +%T)"
  timeout 100 /tmp/$bin bench --model_name /tmp/model-llama3-8b --per_device_train_batch_size 1 \
    --max_seq_length 32768 --use_gradient_checkpointing unsloth --load_in_4bit --device cuda \
    --warmup_steps 1 --steps 3 2>&1 | grep -E "RESULT|error"
done
echo "done $(date +%T)"
