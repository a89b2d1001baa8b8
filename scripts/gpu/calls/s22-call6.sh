#!/usr/bin/env bash
# Session 22 call 6: are the dQ reductions costly because each item's leave in a burst?
# v_defer (HEAD's attention.cu, gpu-bin/s22h/v_defer): the last dQ pass's second 32 columns are
# reduced during the next item's Sᵀ/dPᵀ products instead of at the end of their own item
# (a quarter of the d 128 reductions, half of the d 64 ones, moved off the burst).
# 1. parity --attn-only v_defer  2. bench-attn base / v_defer, two rounds
# Run from the repository root: bash scripts/gpu/calls/s22-call6.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s22h parity
echo "== parity --attn-only v_defer $(date +%T)"
FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s22h/v_defer timeout 120 /tmp/parity --attn-only > $out/parity-v_defer.log 2>&1; echo "exit $?"
grep -E "^(ok|FAIL) " $out/parity-v_defer.log | awk '{print $1}' | sort | uniq -c
grep -E "ptxas attention/flash_bwd_d(64|128)_sm90|^FAIL|panicked|rror" $out/parity-v_defer.log | head -8
for round in 1 2; do
  for v in base v_defer; do
    echo "== bench-attn $v $(date +%T)"
    if [ $v = base ]; then unset FERROTUNE_KERNEL_SOURCE_DIR; else export FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s22h/$v; fi
    timeout 150 /tmp/parity --skip-checks --bench-attn 2>&1 | grep -E "^bench-attn .*bwd|rror|panicked" \
      | sed -E 's/ +/ /g; s/fwd [0-9.]+ ms [0-9.]+ TFLOP\/s //; s/ \(2 stages\) fwd\+bwd [0-9.]+ ms//'
  done
done
echo "done $(date +%T)"
