#!/usr/bin/env bash
# Session 18 call 5 (experiment): the SwiGLU backward with gate/up's adapter products in three
# input stages instead of two (swiglu_lora_bwd3_r{16,32}, chosen where two CTAs per SM still
# fit), build gpu-bin/s18c; FERROTUNE_SWIGLU_STAGES=2 keeps the two-stage kernels.
# 1. parity with each stage count; the kernels timed (parity --bench) with each
# 2. the ladder with three stages
# 3. end to end, alternating two and three stages: 8B without checkpointing and "unsloth", 1B
# Run from the repository root: bash scripts/gpu/calls/s18-call5.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s18c ferrotune parity cuda_parity
for st in 3 2; do
  if [ $st = 2 ]; then export FERROTUNE_SWIGLU_STAGES=2; else unset FERROTUNE_SWIGLU_STAGES; fi
  echo "== parity, $st stages $(date +%T)"
  timeout 120 /tmp/parity --bench > $out/parity-$st.log 2>&1; echo "exit $?"
  grep -E "^(ok|FAIL) " $out/parity-$st.log | awk '{print $1}' | sort | uniq -c
  grep -E "^FAIL|checks, [0-9]+ failed|panicked" $out/parity-$st.log | head -10
  grep -E "^bench (swiglu|lora_tdb)" $out/parity-$st.log
done
unset FERROTUNE_SWIGLU_STAGES
echo "== ladder $(date +%T)"
PARITY=1 timeout 240 bash scripts/gpu/cuda_checks.sh 2>&1 | grep -E "test result|PASS|FAIL|panicked" | tail -10
model llama3-8b; model llama3-1b
for round in 1 2; do
  for m in "llama3-8b false" "llama3-8b unsloth" "llama3-1b false"; do
    set -- $m
    echo "-- 2 stages $* $(date +%T)"; FERROTUNE_SWIGLU_STAGES=2 bench /tmp/ferrotune "$@"
    echo "-- 3 stages $* $(date +%T)"; bench /tmp/ferrotune "$@"
  done
done
echo "done $(date +%T)"
