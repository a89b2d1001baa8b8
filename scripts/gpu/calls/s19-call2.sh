#!/usr/bin/env bash
# Session 19 call 2: two follow-ups of call 1's register dQ reduction (gpu-bin/s19, HEAD's build,
# sources swapped in with FERROTUNE_KERNEL_SOURCE_DIR):
#   v_reg64  the register reduction at d 64 only, d 128 keeps the shared-memory staging
#   v_reg2   as v_reg64, and at d 128 the dQ in four 32-column passes whose lanes also swap rows
#            g / g ^ 1, so that one reduction covers 4 rows x 128 bytes instead of 8 x 64
#            (call 1's d 128 version: 8 x 64, a 4-byte spill, L2 throughput 53 -> 61%)
# 1. parity's attention checks and bench-attn, v_base / v_reg64 / v_reg2 alternating, twice
# 2. ncu of one 8B-shape backward launch with v_reg2
# 3. end to end, alternating: 1B and 8B without checkpointing
# Run from the repository root: bash scripts/gpu/calls/s19-call2.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s19 ferrotune parity
for round in 1 2; do
  for v in v_base v_reg64 v_reg2; do
    echo "== parity --attn-only --bench-attn $v $(date +%T)"
    FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s19/$v timeout 150 /tmp/parity --attn-only --bench-attn > $out/parity-$v-$round.log 2>&1; echo "exit $?"
    grep -E "^(ok|FAIL) " $out/parity-$v-$round.log | awk '{print $1}' | sort | uniq -c
    grep -E "^FAIL|checks, [0-9]+ failed|panicked" $out/parity-$v-$round.log | head -10
    grep -E "^bench-attn " $out/parity-$v-$round.log | sed -E 's/ +/ /g'
  done
done
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null)
echo "== ncu v_reg2 $(date +%T)"
FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s19/v_reg2 timeout 150 $NCU --section SpeedOfLight --section ComputeWorkloadAnalysis \
  --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section WarpStateStats --section LaunchStats --section Occupancy \
  --kernel-name flash_bwd_d128_sm90 --launch-skip 3 --launch-count 1 /tmp/parity --skip-checks --bench-attn > $out/ncu-v_reg2.txt 2>&1
echo "exit $?"
grep -E "Duration|Compute \(SM\) Throughput|L2 Cache Throughput|Issue Slots|Spilling Requests |bank|Registers Per" $out/ncu-v_reg2.txt | sed -E 's/ +/ /g'
model llama3-8b; model llama3-1b
for round in 1 2; do
  for m in "llama3-1b false" "llama3-8b false"; do
    set -- $m
    for v in v_base v_reg64 v_reg2; do
      echo "-- $v $* $(date +%T)"; FERROTUNE_KERNEL_SOURCE_DIR=$PWD/gpu-bin/s19/$v bench /tmp/ferrotune "$@"
    done
  done
done
echo "done $(date +%T)"
