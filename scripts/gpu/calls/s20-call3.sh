#!/usr/bin/env bash
# Session 20 call 3: the TMA build with the d 64 backward held at two CTAs per SM (gpu-bin/s20c:
# its launch asks for 76 KiB of shared memory) against HEAD's build (gpu-bin/s20), and two
# variants of the new source: v_dqn64 (the d 128 backward's dQ in one 64-column pass, which
# 255 registers could not hold before TMA) and v_fwd128b4 (the d 128 TMA forward at 4 CTAs
# per SM, 128 registers).
# 1. parity --attn-only: new and both variants (with their ptxas lines)
# 2. bench-attn: old / new / v_dqn64 / v_fwd128b4, two rounds
# 3. end to end, old / new alternating: 1B without checkpointing (twice) and "unsloth"
# Run from the repository root: bash scripts/gpu/calls/s20-call3.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s20 ferrotune parity
for n in ferrotune parity; do mv /tmp/$n /tmp/old-$n; done
unpack s20c ferrotune parity cuda_parity
for v in new v_dqn64 v_fwd128b4; do
  echo "== parity --attn-only $v $(date +%T)"
  if [ $v = new ]; then unset FERROTUNE_KERNEL_SOURCE_DIR; else export FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s20c/$v; fi
  timeout 120 /tmp/parity --attn-only > $out/parity-$v.log 2>&1; echo "exit $?"
  grep -E "^(ok|FAIL) " $out/parity-$v.log | awk '{print $1}' | sort | uniq -c
  grep -E "ptxas attention/flash_(fwd|bwd)_d(64|128)_sm90|^FAIL|panicked|rror" $out/parity-$v.log | head -8
done
for round in 1 2; do
  for v in old new v_dqn64 v_fwd128b4; do
    echo "== bench-attn $v $(date +%T)"
    unset FERROTUNE_KERNEL_SOURCE_DIR; bin=/tmp/parity
    case $v in old) bin=/tmp/old-parity;; v_*) export FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s20c/$v;; esac
    timeout 150 $bin --skip-checks --bench-attn 2>&1 | grep -E "^bench-attn |rror|panicked" | sed -E 's/ +/ /g'
  done
done
unset FERROTUNE_KERNEL_SOURCE_DIR
model llama3-1b
for m in "llama3-1b false" "llama3-1b unsloth" "llama3-1b false"; do
  set -- $m
  echo "-- old $* $(date +%T)"; bench /tmp/old-ferrotune "$@"
  echo "-- new $* $(date +%T)"; bench /tmp/ferrotune "$@"
done
echo "done $(date +%T)"
