#!/usr/bin/env bash
# Session 22 call 4: the key-pair backward with its warpgroups one slot apart (build gpu-bin/s22b:
# phase A = Sᵀ, dPᵀ, softmax, dV, dSᵀ; phase B = dQ over both key blocks, dK; warpgroup 0 runs
# A(m) while warpgroup 1 runs B(m - 1) and the reverse; dSᵀ double-buffered, three stages)
# 1. parity --attn-only (every backward kernel on every attention case)
# 2. bench-attn, two rounds
# 3. 8B QLoRA + "unsloth" at 1 x 32768 and 8B at 2 x 2048 without checkpointing: default and pair
# Run from the repository root: bash scripts/gpu/calls/s22-call4.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s22b ferrotune parity
echo "== parity --attn-only $(date +%T)"
timeout 120 /tmp/parity --attn-only > $out/parity.log 2>&1; echo "exit $?"
grep -E "^(ok|FAIL) " $out/parity.log | awk '{print $1}' | sort | uniq -c
grep -E "ptxas attention/flash_bwd_d(64|128)_(sm90|pair)|^FAIL|panicked" $out/parity.log | head -12
for round in 1 2; do
  echo "== bench-attn $(date +%T)"
  timeout 150 /tmp/parity --skip-checks --bench-attn 2>&1 | grep -E "^bench-attn .*bwd|rror|panicked" \
    | sed -E 's/ +/ /g; s/fwd [0-9.]+ ms [0-9.]+ TFLOP\/s //; s/ \(2 stages\) fwd\+bwd [0-9.]+ ms//'
done
model llama3-8b
for k in warpgroup pair; do
  echo "== $k 8B QLoRA 1 x 32768 $(date +%T)"
  FERROTUNE_FLASH_BWD=$k timeout 100 /tmp/ferrotune bench --model_name /tmp/model-llama3-8b --per_device_train_batch_size 1 \
    --max_seq_length 32768 --use_gradient_checkpointing unsloth --load_in_4bit --device cuda \
    --warmup_steps 1 --steps 3 2>&1 | grep -E "RESULT|error"
done
for k in warpgroup pair; do
  echo "-- $k llama3-8b false $(date +%T)"; FERROTUNE_FLASH_BWD=$k bench /tmp/ferrotune llama3-8b false
done
echo "done $(date +%T)"
