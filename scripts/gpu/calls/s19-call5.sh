#!/usr/bin/env bash
# Session 19 call 5 (experiment): the d 64 Hopper backward at three CTAs per SM now that its dQ
# needs no staging: `__launch_bounds__(128, 3)` on flash_bwd_d64_sm90 (166 registers, no spill;
# 3 x 59 KiB of shared memory fit), swapped in as gpu-bin/s19c/v_3cta/attention.cu on call 4's
# build (two CTAs per SM, 187 registers). Session 8 measured three CTAs 2% slower (§14), with
# the staging.
# 1. parity's attention checks and bench-attn, alternating, twice
# 2. end to end, alternating: 1B without checkpointing and "unsloth"
# Run from the repository root: bash scripts/gpu/calls/s19-call5.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s19c ferrotune parity
for round in 1 2; do
  for v in two v_3cta; do
    echo "== parity --attn-only --bench-attn $v $(date +%T)"
    if [ $v = two ]; then unset FERROTUNE_KERNEL_SOURCE_DIR; else export FERROTUNE_KERNEL_SOURCE_DIR=$PWD/gpu-bin/s19c/$v; fi
    timeout 150 /tmp/parity --attn-only --bench-attn > $out/parity-$v-$round.log 2>&1; echo "exit $?"
    grep -E "^(ok|FAIL) " $out/parity-$v-$round.log | awk '{print $1}' | sort | uniq -c
    grep -E "^FAIL|panicked" $out/parity-$v-$round.log | head -5
    grep -E "^bench-attn llama3.2" $out/parity-$v-$round.log | sed -E 's/ +/ /g'
  done
done
unset FERROTUNE_KERNEL_SOURCE_DIR
model llama3-1b
for round in 1 2 3; do
  for m in "llama3-1b false" "llama3-1b unsloth"; do
    set -- $m
    echo "-- two    $* $(date +%T)"; bench /tmp/ferrotune "$@"
    echo "-- v_3cta $* $(date +%T)"; FERROTUNE_KERNEL_SOURCE_DIR=$PWD/gpu-bin/s19c/v_3cta bench /tmp/ferrotune "$@"
  done
done
echo "done $(date +%T)"
