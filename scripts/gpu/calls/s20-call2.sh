#!/usr/bin/env bash
# Session 20 call 2: the attention tiles loaded by TMA (gpu-bin/s20b: flash_fwd_d{64,128}_sm90,
# flash_bwd_d{64,128}_sm90) against HEAD's build (gpu-bin/s20, cp.async), and two variants of
# the new source: v_fwdb4 (the d 64 TMA forward at 4 CTAs per SM: 106 registers) and v_dqn64
# (the d 128 backward's dQ in 64-column passes: 228 registers leave room).
# 1. parity --attn-only of the new build, then every check
# 2. bench-attn: old / new / v_fwdb4 / v_dqn64, two rounds
# 3. ladder with the new build; end to end old / new alternating: 1B and 8B without checkpointing
# Run from the repository root: bash scripts/gpu/calls/s20-call2.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s20 ferrotune parity cuda_parity
for n in ferrotune parity; do mv /tmp/$n /tmp/old-$n; done
unpack s20b ferrotune parity cuda_parity
echo "== parity --attn-only $(date +%T)"
timeout 120 /tmp/parity --attn-only > $out/parity-attn.log 2>&1; echo "exit $?"
grep -E "^(ok|FAIL) " $out/parity-attn.log | awk '{print $1}' | sort | uniq -c
grep -E "^FAIL|panicked|rror" $out/parity-attn.log | head -10
echo "== parity $(date +%T)"
timeout 120 /tmp/parity > $out/parity.log 2>&1; echo "exit $?"
grep -E "^(ok|FAIL) " $out/parity.log | awk '{print $1}' | sort | uniq -c
for round in 1 2; do
  for v in old new v_fwdb4 v_dqn64; do
    echo "== bench-attn $v $(date +%T)"
    unset FERROTUNE_KERNEL_SOURCE_DIR; bin=/tmp/parity
    case $v in old) bin=/tmp/old-parity;; v_*) export FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s20b/$v;; esac
    timeout 150 $bin --skip-checks --bench-attn 2>&1 | grep -E "^bench-attn |rror|panicked" | sed -E 's/ +/ /g'
  done
done
unset FERROTUNE_KERNEL_SOURCE_DIR
for v in v_fwdb4 v_dqn64; do
  echo "== parity --attn-only $v $(date +%T)"
  FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s20b/$v timeout 120 /tmp/parity --attn-only > $out/parity-$v.log 2>&1; echo "exit $?"
  grep -E "^(ok|FAIL) " $out/parity-$v.log | awk '{print $1}' | sort | uniq -c
done
echo "== ladder $(date +%T)"
PARITY=1 timeout 240 bash scripts/gpu/cuda_checks.sh 2>&1 | grep -E "test result|PASS|FAIL|panicked" | tail -10
model llama3-8b; model llama3-1b
for round in 1 2; do
  for m in "llama3-1b false" "llama3-8b false"; do
    set -- $m
    echo "-- old $* $(date +%T)"; bench /tmp/old-ferrotune "$@"
    echo "-- new $* $(date +%T)"; bench /tmp/ferrotune "$@"
  done
done
echo "done $(date +%T)"
