#!/usr/bin/env bash
# Session 22 call 3: where the one-warpgroup backward's dQ reductions cost (call 1: a third of the
# kernel, the same with plain stores). Build gpu-bin/s22; variants of its attention.cu swapped in
# with FERROTUNE_KERNEL_SOURCE_DIR (each changes flash_bwd_sm90 only):
#   v_noshfl  dq_add_rows without its lane trades (wrong results: timing bound of the shuffles)
#   v_red2    the accumulators' column pairs reduced as they are: 8-byte red.v2, no shuffles
#   v_bulk0   dQ staged row-major in the item's free stage buffer, added by 64 bulk async
#             reductions (cp.reduce.async.bulk .add.f32, one per row); read out before the
#             next item's barrier
#   v_bulk    the same, read out before the dSᵀ barrier, the next item's loads issued after it
# 1. parity --attn-only for the three correct variants
# 2. bench-attn: base and the four variants, two rounds
# Run from the repository root: bash scripts/gpu/calls/s22-call3.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s22 parity
for v in v_red2 v_bulk0 v_bulk; do
  echo "== parity --attn-only $v $(date +%T)"
  FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s22/$v timeout 120 /tmp/parity --attn-only > $out/parity-$v.log 2>&1; echo "exit $?"
  grep -E "^(ok|FAIL) " $out/parity-$v.log | awk '{print $1}' | sort | uniq -c
  grep -E "ptxas attention/flash_bwd_d(64|128)_sm90|^FAIL|panicked|rror" $out/parity-$v.log | head -8
done
for round in 1 2; do
  for v in base v_noshfl v_red2 v_bulk0 v_bulk; do
    echo "== bench-attn $v $(date +%T)"
    if [ $v = base ]; then unset FERROTUNE_KERNEL_SOURCE_DIR; else export FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s22/$v; fi
    timeout 150 /tmp/parity --skip-checks --bench-attn 2>&1 | grep -E "^bench-attn .*bwd|rror|panicked" \
      | sed -E 's/ +/ /g; s/fwd [0-9.]+ ms [0-9.]+ TFLOP\/s //; s/ \(2 stages\) fwd\+bwd [0-9.]+ ms//'
  done
done
echo "done $(date +%T)"
