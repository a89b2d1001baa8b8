#!/usr/bin/env bash
# Session 16 call 3: where lora_tdb's time goes. parity --skip-checks --bench (the call-2 binary)
# with the two-stage source (v_base, the tree's) and three diagnostic variants that skip the
# fp32 red.adds of dB (v_nodb), of t (v_not), or both (v_none) — wrong results, timing only;
# then ncu's SpeedOfLight / WarpStateStats of one lora_tdb_r16 launch (v_base, 4096 x 4096).
set -uo pipefail
out=${OUT:-/tmp}
# Run from the repository root: bash scripts/gpu/calls/s16-call3.sh (binaries in gpu-bin/s16/, built as docs/gpu.md says).
python3 -c "
import lzma, os
open('/tmp/parity','wb').write(lzma.open('gpu-bin/s16/parity.xz').read()); os.chmod('/tmp/parity',0o755)"
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:$(python3 -c 'import os,nvidia; print(":".join(os.path.join(d,"cu13","lib") for d in nvidia.__path__))')"
export FERROTUNE_CACHE_DIR=/tmp/ftcache NO_COLOR=1 RUST_BACKTRACE=1
for v in v_base v_nodb v_not v_none v_base; do
  echo "== $v $(date +%T)"
  FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s16/$v timeout 60 /tmp/parity --skip-checks --bench 2>&1 | grep -E "^bench (lora|swiglu_bwd|rmsnorm_bwd)|panicked|rror"
done
echo "== ncu $(date +%T)"
FERROTUNE_KERNEL_SOURCE_DIR=gpu-bin/s16/v_base timeout 120 /usr/local/cuda/bin/ncu --section SpeedOfLight --section WarpStateStats --section Occupancy --section MemoryWorkloadAnalysis \
  --kernel-name lora_tdb_r16 --launch-skip 5 --launch-count 1 /tmp/parity --skip-checks --bench > $out/ncu_tdb.txt 2>&1
echo "exit $?"
grep -E "Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Achieved Occupancy|Theoretical Occupancy|Stall|Warp Cycles Per|L2 Hit|Registers|Block Limit|Elapsed Cycles|SM Frequency|One or More|No Eligible|Active Warps" $out/ncu_tdb.txt | head -40
echo "done $(date +%T)"
