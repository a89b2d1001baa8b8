#!/usr/bin/env bash
# Session 21 call 4: call 2's build (gpu-bin/s21, HEAD 3ee108c) and one more backward variant
# swapped in as source: v_dkdefer does not wait for an item's dK before the next item (its
# Sᵀ/dPᵀ go behind it; the next item's loads move after the dSᵀ barrier, by which every warp's
# dK is done). ptxas: d 64 202 registers; d 128 255 registers and a 4 B spill.
# 1. parity --attn-only v_dkdefer; bench-attn new / v_dkdefer, two rounds
# 2. 8B QLoRA + "unsloth" at batch 1 x 65536: ours with the faster backward at 32k (bench-attn),
#    then Unsloth, if the time allows
# Run from the repository root: bash scripts/gpu/calls/s21-call4.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
t0=$(date +%s)
unpack s21 ferrotune parity
echo "== parity --attn-only v_dkdefer $(date +%T)"
FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s21/v_dkdefer timeout 120 /tmp/parity --attn-only > $out/parity-v_dkdefer.log 2>&1; pe=$?; echo "exit $pe"
grep -E "^(ok|FAIL) " $out/parity-v_dkdefer.log | awk '{print $1}' | sort | uniq -c
grep -E "ptxas attention/flash_bwd_d(64|128)_sm90|^FAIL|panicked|rror" $out/parity-v_dkdefer.log | head -8
for round in 1 2; do
  for v in new v_dkdefer; do
    echo "== bench-attn $v $(date +%T)"
    if [ $v = new ]; then unset FERROTUNE_KERNEL_SOURCE_DIR; else export FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s21/$v; fi
    timeout 150 /tmp/parity --skip-checks --bench-attn 2>&1 | grep -E "^bench-attn .*bwd|rror|panicked" | sed -E 's/ +/ /g' | tee -a $out/bench-$v.txt
  done
done
unset FERROTUNE_KERNEL_SOURCE_DIR
# The variant runs the long sequence if it passed parity and its 32k backward was faster.
med() { grep T32768 $out/bench-$1.txt | grep -oE 'bwd\[warpgroup\] [0-9.]+' | awk '{s+=$2} END {print s/NR}'; }
use=new
if [ $pe = 0 ] && awk -v a="$(med v_dkdefer)" -v b="$(med new)" 'BEGIN {exit !(a < b)}'; then
  use=v_dkdefer; export FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s21/v_dkdefer
fi
model llama3-8b
echo "== ferrotune ($use) 8B QLoRA 1 x 65536 $(date +%T)"
timeout 170 /tmp/ferrotune bench --model_name /tmp/model-llama3-8b --per_device_train_batch_size 1 \
  --max_seq_length 65536 --use_gradient_checkpointing unsloth --load_in_4bit --device cuda \
  --warmup_steps 1 --steps 2 2>&1 | grep -E "RESULT|error"
unset FERROTUNE_KERNEL_SOURCE_DIR
el=$(( $(date +%s) - t0 ))
if [ $el -gt 300 ]; then echo "skip Unsloth (elapsed ${el}s)"; else
  echo "== Unsloth 8B QLoRA 1 x 65536 $(date +%T)"
  STEPS=1 timeout 200 bash .bench/run_anchor.sh llama3-8b 1 65536 unsloth-4bit-ckpt 2>&1 | grep -E "^RESULT|failed|Error" | head -5
fi
echo "done $(date +%T)"
