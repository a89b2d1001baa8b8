#!/usr/bin/env bash
# Session 19 call 1: the Hopper attention backward's dQ reduced into dq_acc straight from the
# wgmma accumulators (a lane-pair shuffle gives each lane four consecutive columns, one 16-byte
# reduction each) instead of through a 32 KiB fp32 staging tile in shared memory (perf-notes §32).
# Both sources are swapped in with FERROTUNE_KERNEL_SOURCE_DIR on HEAD's build (gpu-bin/s19):
# v_base = the tree's attention.cu before the change, v_reg = with it.
# 1. parity's attention checks and bench-attn with each, alternating, twice
# 2. ncu of one 8B-shape backward launch with each (throughput, shared-memory and warp-state sections)
# 3. the ladder with v_reg; end to end, alternating: 8B without checkpointing, 1B, 8B "unsloth"
# Run from the repository root: bash scripts/gpu/calls/s19-call1.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s19 ferrotune parity cuda_parity
for round in 1 2; do
  for v in v_base v_reg; do
    echo "== parity --attn-only --bench-attn $v $(date +%T)"
    FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s19/$v timeout 150 /tmp/parity --attn-only --bench-attn > $out/parity-$v-$round.log 2>&1; echo "exit $?"
    grep -E "^(ok|FAIL) " $out/parity-$v-$round.log | awk '{print $1}' | sort | uniq -c
    grep -E "^FAIL|checks, [0-9]+ failed|panicked" $out/parity-$v-$round.log | head -10
    grep -E "^bench-attn " $out/parity-$v-$round.log
  done
done
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null)
for v in v_base v_reg; do
  echo "== ncu $v $(date +%T)"
  FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s19/$v timeout 150 $NCU --section SpeedOfLight --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section WarpStateStats --section LaunchStats --section Occupancy \
    --kernel-name flash_bwd_d128_sm90 --launch-skip 3 --launch-count 1 /tmp/parity --skip-checks --bench-attn > $out/ncu-$v.txt 2>&1
  echo "exit $?"
  grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Shared|Bank|Stall|Warp Cycles Per|Issue Slots|Executed Ipc|No Eligible|Eligible Warps|Local|Registers|SM Frequency" $out/ncu-$v.txt | head -40
done
echo "== ladder v_reg $(date +%T)"
FERROTUNE_KERNEL_SOURCE_DIR=$PWD/gpu-bin/s19/v_reg PARITY=1 timeout 240 bash scripts/gpu/cuda_checks.sh 2>&1 | grep -E "test result|PASS|FAIL|panicked" | tail -10
model llama3-8b; model llama3-1b
for round in 1 2; do
  for m in "llama3-8b false" "llama3-1b false" "llama3-8b unsloth"; do
    set -- $m
    for v in v_base v_reg; do
      echo "-- $v $* $(date +%T)"; FERROTUNE_KERNEL_SOURCE_DIR=$PWD/gpu-bin/s19/$v bench /tmp/ferrotune "$@"
    done
  done
done
echo "done $(date +%T)"
