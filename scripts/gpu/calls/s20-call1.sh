#!/usr/bin/env bash
# Session 20 call 1: HEAD's build (8a59594, gpu-bin/s20) and four attention.cu variants swapped
# in with FERROTUNE_KERNEL_SOURCE_DIR:
#   v_bwdtop     Hopper backward: the next item's Q/dO/lse/delta loads issued at the top of the
#                item (after its barrier) instead of after the dV/dK products
#   v_bwdnoload  Hopper backward without per-item loads (wrong results: timing bound only)
#   v_fwdk2      forward, d 64: K double-buffered, the next K load issued with this block's V
#   v_fwdnoload  forward without in-loop K/V loads (wrong results: timing bound only)
# 1. parity (every kernel check; confirms 8a59594's rope_blocks on a GPU), parity of the two
#    correct variants (attention checks)
# 2. bench-attn, base and the four variants, two rounds
# 3. ncu stall reasons per issued instruction, one launch each of the four base kernels
# Run from the repository root: bash scripts/gpu/calls/s20-call1.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s20 ferrotune parity cuda_parity
echo "== parity $(date +%T)"
timeout 120 /tmp/parity > $out/parity.log 2>&1; echo "exit $?"
grep -E "^(ok|FAIL) " $out/parity.log | awk '{print $1}' | sort | uniq -c
grep -E "^FAIL|checks, [0-9]+ failed|panicked" $out/parity.log | head -10
grep -E "rope" $out/parity.log | head -6
for v in v_bwdtop v_fwdk2; do
  echo "== parity --attn-only $v $(date +%T)"
  FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s20/$v timeout 120 /tmp/parity --attn-only > $out/parity-$v.log 2>&1; echo "exit $?"
  grep -E "^(ok|FAIL) " $out/parity-$v.log | awk '{print $1}' | sort | uniq -c
  grep -E "^FAIL|panicked|error" $out/parity-$v.log | head -5
done
for round in 1 2; do
  for v in base v_bwdtop v_bwdnoload v_fwdk2 v_fwdnoload; do
    echo "== bench-attn $v $(date +%T)"
    if [ $v = base ]; then unset FERROTUNE_KERNEL_SOURCE_DIR; else export FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s20/$v; fi
    timeout 150 /tmp/parity --skip-checks --bench-attn 2>&1 | grep -E "^bench-attn |error|panicked" | sed -E 's/ +/ /g'
  done
done
unset FERROTUNE_KERNEL_SOURCE_DIR
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null)
for kn in flash_fwd_d128 flash_bwd_d128_sm90 flash_fwd_d64 flash_bwd_d64_sm90; do
  echo "== ncu $kn $(date +%T)"
  timeout 120 $NCU --section SpeedOfLight --section WarpStateStats \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
    --kernel-name $kn --launch-skip 3 --launch-count 1 /tmp/parity --skip-checks --bench-attn > $out/ncu-$kn.txt 2>&1
  echo "exit $?"
  grep -E "Duration|SM Frequency|Compute \(SM\) Throughput|Warp Cycles Per Issued|stalled" $out/ncu-$kn.txt \
    | awk '$NF+0 >= 0.05 || /Duration|Frequency|Throughput|Cycles/' | sed -E 's/ +/ /g' | head -30
done
echo "done $(date +%T)"
