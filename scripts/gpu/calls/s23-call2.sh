#!/usr/bin/env bash
# Session 23 call 2: the rest of the record for HEAD's build (gpu-bin/s23).
# 1. the ladder (engine vs CPU engine, HF+PEFT parity)
# 2. Unsloth's 1B modes once more (its 1B readings move by up to ±25% between calls) and ours
# 3. the 8B step without checkpointing twice with nvidia-smi sampling (clock and power at the
#    cap, perf-notes §15), then one step under ncu: the ceiling's kernel budget today (§6 had
#    session 16's)
# Run from the repository root: bash scripts/gpu/calls/s23-call2.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s23 ferrotune cuda_parity
echo "== ladder $(date +%T)"
ladder
echo "== Unsloth 1B $(date +%T)"
anchor llama3-1b unsloth unsloth-ckpt
for mode in false unsloth; do
  echo "-- ferrotune llama3-1b $mode $(date +%T)"
  bench_json /tmp/ferrotune llama3-1b $mode
done
model llama3-8b
for i in 1 2; do
  echo "-- ferrotune llama3-8b false, 20 steps $(date +%T)"
  with_smi 8b-$i bench /tmp/ferrotune llama3-8b false --steps 20
done
echo "== ncu llama3-8b false $(date +%T)"
ncu_step 8b /tmp/ferrotune llama3-8b false
echo "done $(date +%T)"
