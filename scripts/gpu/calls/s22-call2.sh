#!/usr/bin/env bash
# Session 22 call 2: the key-pair backward (flash_bwd_d{64,128}_pair, build gpu-bin/s22 = HEAD
# 151996b + the pair kernels, selectable with FERROTUNE_FLASH_BWD=pair; the default stays the
# one-warpgroup kernel)
# 1. parity (every kernel check: the pair kernels on every attention case) and the ladder
# 2. bench-attn (times every backward kernel), two rounds
# 3. end to end: 8B at 2 x 2048 without checkpointing, default and pair alternating; 1B the same
# 4. 8B QLoRA + "unsloth" at 1 x 32768: default and pair
# Run from the repository root: bash scripts/gpu/calls/s22-call2.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s22 ferrotune parity cuda_parity
echo "== parity $(date +%T)"
timeout 120 /tmp/parity > $out/parity.log 2>&1; echo "exit $?"
grep -E "^(ok|FAIL) " $out/parity.log | awk '{print $1}' | sort | uniq -c
grep -E "^(ok|FAIL) " $out/parity.log | grep -c "flash_bwd\[pair\]"
grep -E "ptxas attention/flash_bwd_d(64|128)_(sm90|pair)|^FAIL|panicked" $out/parity.log | head -12
echo "== ladder $(date +%T)"
PARITY=1 timeout 150 bash scripts/gpu/cuda_checks.sh 2>&1 | grep -E "test result|PASS|FAIL|panicked" | tail -10
for round in 1 2; do
  echo "== bench-attn $(date +%T)"
  timeout 150 /tmp/parity --skip-checks --bench-attn 2>&1 | grep -E "^bench-attn |rror|panicked" | sed -E 's/ +/ /g'
done
for shape in llama3-8b llama3-1b; do
  model $shape
  for round in 1 2; do
    for k in warpgroup pair; do
      echo "-- $k $shape false $(date +%T)"; FERROTUNE_FLASH_BWD=$k bench /tmp/ferrotune $shape false
    done
  done
done
for k in warpgroup pair; do
  echo "== $k 8B QLoRA 1 x 32768 $(date +%T)"
  FERROTUNE_FLASH_BWD=$k timeout 100 /tmp/ferrotune bench --model_name /tmp/model-llama3-8b --per_device_train_batch_size 1 \
    --max_seq_length 32768 --use_gradient_checkpointing unsloth --load_in_4bit --device cuda \
    --warmup_steps 1 --steps 3 2>&1 | grep -E "RESULT|error"
done
echo "done $(date +%T)"
