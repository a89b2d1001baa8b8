#!/usr/bin/env bash
# Session 21 call 3: call 2's build (gpu-bin/s21, HEAD 3ee108c) and
# 1. two variants of the Hopper forward (swapped in as source): v_fwdpv issues a key block's
#    S = Q·Kᵀ behind the last block's P·V, which it no longer waits for before the barrier and
#    the next K (4 CTAs per SM at both widths, d 128 at 128 registers); v_fwdpv3 the same with
#    the d 128 forward at 3 CTAs per SM (142 registers). parity --attn-only each, then
#    bench-attn new / v_fwdpv / v_fwdpv3, two rounds
# 2. 8B QLoRA + "unsloth" at batch 1 x 65536: ours (new), then Unsloth (last measured in
#    session 15: 14.40 s against our 17.93 s)
# 3. 8B at batch 2 x 2048 without checkpointing, new / old (gpu-bin/s20d) alternating, twice
# Run from the repository root: bash scripts/gpu/calls/s21-call3.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
t0=$(date +%s)
unpack s20d ferrotune
mv /tmp/ferrotune /tmp/old-ferrotune
unpack s21 ferrotune parity
for v in v_fwdpv v_fwdpv3; do
  echo "== parity --attn-only $v $(date +%T)"
  FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s21/$v timeout 120 /tmp/parity --attn-only > $out/parity-$v.log 2>&1; echo "exit $?"
  grep -E "^(ok|FAIL) " $out/parity-$v.log | awk '{print $1}' | sort | uniq -c
  grep -E "ptxas attention/flash_fwd_d(64|128)_sm90|^FAIL|panicked|rror" $out/parity-$v.log | head -8
done
for round in 1 2; do
  for v in new v_fwdpv v_fwdpv3; do
    echo "== bench-attn $v $(date +%T)"
    if [ $v = new ]; then unset FERROTUNE_KERNEL_SOURCE_DIR; else export FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s21/$v; fi
    timeout 150 /tmp/parity --skip-checks --bench-attn 2>&1 | grep -E "^bench-attn |rror|panicked" | sed -E 's/ +/ /g'
  done
done
unset FERROTUNE_KERNEL_SOURCE_DIR
model llama3-8b
echo "== ferrotune 8B QLoRA 1 x 65536 $(date +%T)"
timeout 170 /tmp/ferrotune bench --model_name /tmp/model-llama3-8b --per_device_train_batch_size 1 \
  --max_seq_length 65536 --use_gradient_checkpointing unsloth --load_in_4bit --device cuda \
  --warmup_steps 1 --steps 2 2>&1 | grep -E "RESULT|offload|error"
echo "== Unsloth 8B QLoRA 1 x 65536 $(date +%T)"
STEPS=1 timeout 220 bash .bench/run_anchor.sh llama3-8b 1 65536 unsloth-4bit-ckpt 2>&1 | grep -E "^RESULT|failed|Error" | head -5
for round in 1 2; do
  for bin in ferrotune old-ferrotune; do
    el=$(( $(date +%s) - t0 ))
    if [ $el -gt 540 ]; then echo "skip $bin (elapsed ${el}s)"; continue; fi
    echo "-- $bin llama3-8b false $(date +%T)"; bench /tmp/$bin llama3-8b false
  done
done
echo "done $(date +%T)"
