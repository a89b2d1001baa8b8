#!/usr/bin/env bash
# Session 21 call 1: HEAD's kernels (the fffa53b build, gpu-bin/s20d: attention.cu unchanged
# since) against three variants of the Hopper attention backward swapped in with
# FERROTUNE_KERNEL_SOURCE_DIR:
#   v_ovl    dQ's first 64-column pass issued before dV/dK in its own wgmma group; its
#            reductions into dq_acc run while the tensor cores do dV/dK (one barrier fewer)
#   v_split  v_ovl, and Sᵀ, dPᵀ in two groups: Pᵀ and dV += Pᵀ·dO while dPᵀ is in flight
#   v_nolse  HEAD without the per-item lse/delta cp.async (wrong results: timing bound only)
# 1. parity --attn-only for v_ovl and v_split
# 2. bench-attn: base and the three variants, two rounds
# 3. end to end 1B without checkpointing and "unsloth": base / v_ovl / v_split alternating
# Run from the repository root: bash scripts/gpu/calls/s21-call1.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s20d ferrotune parity
for v in v_ovl v_split; do
  echo "== parity --attn-only $v $(date +%T)"
  FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s21/$v timeout 120 /tmp/parity --attn-only > $out/parity-$v.log 2>&1; echo "exit $?"
  grep -E "^(ok|FAIL) " $out/parity-$v.log | awk '{print $1}' | sort | uniq -c
  grep -E "ptxas attention/flash_bwd_d(64|128)_sm90|^FAIL|panicked|rror" $out/parity-$v.log | head -8
done
for round in 1 2; do
  for v in base v_ovl v_split v_nolse; do
    echo "== bench-attn $v $(date +%T)"
    if [ $v = base ]; then unset FERROTUNE_KERNEL_SOURCE_DIR; else export FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s21/$v; fi
    timeout 150 /tmp/parity --skip-checks --bench-attn 2>&1 | grep -E "^bench-attn .*bwd|rror|panicked" | sed -E 's/ +/ /g'
  done
done
model llama3-1b
for m in "llama3-1b false" "llama3-1b unsloth" "llama3-1b false"; do
  for v in base v_ovl v_split; do
    if [ $v = base ]; then unset FERROTUNE_KERNEL_SOURCE_DIR; else export FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s21/$v; fi
    echo "-- $v $m $(date +%T)"; bench /tmp/ferrotune $m
  done
done
echo "done $(date +%T)"
