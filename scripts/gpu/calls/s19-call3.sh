#!/usr/bin/env bash
# Session 19 call 3: the build with the Hopper backward's dQ added from the registers at both
# widths (dq_add_rows: 32-column passes at d 128, 64 at d 64; every reduction 4 rows x 128 bytes),
# gpu-bin/s19b; v_base = the previous attention.cu swapped in with FERROTUNE_KERNEL_SOURCE_DIR.
# 1. parity (every kernel check); bench-attn, v_base / this build alternating, twice
# 2. the ladder (engine vs CPU engine, HF+PEFT parity)
# 3. end to end, alternating: 1B and 8B without checkpointing, 8B "unsloth"
# Run from the repository root: bash scripts/gpu/calls/s19-call3.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s19b ferrotune parity cuda_parity
echo "== parity $(date +%T)"
timeout 120 /tmp/parity > $out/parity.log 2>&1; echo "exit $?"
grep -E "^(ok|FAIL) " $out/parity.log | awk '{print $1}' | sort | uniq -c
grep -E "^FAIL|checks, [0-9]+ failed|panicked" $out/parity.log | head -10
grep -E "flash_bwd\[warpgroup\]\+rope dq" $out/parity.log | head -2
for round in 1 2; do
  for v in v_base new; do
    echo "== bench-attn $v $(date +%T)"
    if [ $v = new ]; then unset FERROTUNE_KERNEL_SOURCE_DIR; else export FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s19b/v_base; fi
    timeout 150 /tmp/parity --skip-checks --bench-attn 2>&1 | grep -E "^bench-attn " | sed -E 's/ +/ /g'
  done
done
unset FERROTUNE_KERNEL_SOURCE_DIR
echo "== ladder $(date +%T)"
PARITY=1 timeout 240 bash scripts/gpu/cuda_checks.sh 2>&1 | grep -E "test result|PASS|FAIL|panicked" | tail -10
model llama3-8b; model llama3-1b
for round in 1 2; do
  for m in "llama3-1b false" "llama3-8b false" "llama3-8b unsloth"; do
    set -- $m
    echo "-- v_base $* $(date +%T)"; FERROTUNE_KERNEL_SOURCE_DIR=$PWD/gpu-bin/s19b/v_base bench /tmp/ferrotune "$@"
    echo "-- new    $* $(date +%T)"; bench /tmp/ferrotune "$@"
  done
done
echo "done $(date +%T)"
