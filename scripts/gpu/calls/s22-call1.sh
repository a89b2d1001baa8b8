#!/usr/bin/env bash
# Session 22 call 1: how much do the Hopper attention backward's dQ reductions cost?
# HEAD's kernels (the s21 build: attention.cu's machine code unchanged since 3ee108c) against
# three timing bounds swapped in with FERROTUNE_KERNEL_SOURCE_DIR (wrong results on purpose):
#   v_nodq    no dQ reductions at all (the wgmma products still run)
#   v_dqst    each red.global.add.v4 replaced by a plain st.global.v4 (same bytes, no atomics)
#   v_dqhalf  every other item's reductions left out (half the traffic: what 128-key CTAs
#             summing two warpgroups' dQ would issue)
# 1. bench-attn: base and the three bounds, two rounds
# 2. ncu of the base backward: d 128 at 2 x 2048 and 1 x 32k, d 64 at 2 x 2048 (SOL, memory
#    tables with L2 reduction rows, stall reasons, red counters)
# Run from the repository root: bash scripts/gpu/calls/s22-call1.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s21 parity
for round in 1 2; do
  for v in base v_nodq v_dqst v_dqhalf; do
    echo "== bench-attn $v $(date +%T)"
    if [ $v = base ]; then unset FERROTUNE_KERNEL_SOURCE_DIR; else export FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s22/$v; fi
    timeout 150 /tmp/parity --skip-checks --bench-attn 2>&1 | grep -E "^bench-attn .*bwd|rror|panicked" | sed -E 's/ +/ /g'
  done
done
unset FERROTUNE_KERNEL_SOURCE_DIR
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null)
$NCU --query-metrics --chip gh100 2>/dev/null | grep -E "op_red|gmma|pipe_tensor" > $out/ncu-metric-names.txt
wc -l $out/ncu-metric-names.txt
# flash_bwd_d128_sm90 launches: 23 per 8B shape (3 warm-up + 20 timed); the 32k shape is third.
for job in "flash_bwd_d128_sm90 3 2k" "flash_bwd_d128_sm90 49 32k" "flash_bwd_d64_sm90 3 2k"; do
  set -- $job
  echo "== ncu $1 $3 $(date +%T)"
  timeout 200 $NCU --section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
    --section WarpStateStats --section ComputeWorkloadAnalysis \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
    --kernel-name $1 --launch-skip $2 --launch-count 1 /tmp/parity --skip-checks --bench-attn > $out/ncu-$1-$3.txt 2>&1
  echo "exit $?"
  grep -E "Duration|SM Frequency|Throughput|Warp Cycles Per Issued|stalled|Red|red|L2 Hit|Busy" $out/ncu-$1-$3.txt \
    | awk '$NF+0 >= 0.05 || /Duration|Frequency|Throughput|Cycles|Red|red/' | sed -E 's/ +/ /g' | head -60
  echo "-- counters"
  timeout 200 $NCU --metrics lts__t_sectors_op_red.sum,lts__t_requests_op_red.sum,lts__t_sectors_op_red.sum.per_second,lts__t_sectors.sum.per_second,lts__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_sectors_op_red.avg.pct_of_peak_sustained_elapsed,l1tex__m_xbar2l1tex_read_bytes.sum.per_second,l1tex__m_l1tex2xbar_write_bytes.sum.per_second,gpu__time_duration.sum \
    --kernel-name $1 --launch-skip $2 --launch-count 1 /tmp/parity --skip-checks --bench-attn > $out/ncu-red-$1-$3.txt 2>&1
  echo "exit $?"
  grep -E "lts__|l1tex__|gpu__|ERR|rror" $out/ncu-red-$1-$3.txt | sed -E 's/ +/ /g' | head -20
done
echo "done $(date +%T)"
