#!/usr/bin/env bash
# Session 17 call 1 (diagnostic, session 16's build 08bad26): where a 1B step goes today.
# 1. 1B no checkpointing and "unsloth", two runs each, nvidia-smi sampling clock and power.
# 2. one 1B step of each mode under ncu, summed by kernel and grid.
set -uo pipefail
out=${OUT:-/tmp}
# Run from the repository root: bash scripts/gpu/calls/s17-call1.sh (binaries in gpu-bin/s17/, built as docs/gpu.md says).
python3 - <<'PY'
import lzma, os
for n in ("ferrotune",):
    open(f"/tmp/{n}", "wb").write(lzma.open(f"gpu-bin/s16/{n}.xz").read()); os.chmod(f"/tmp/{n}", 0o755)
PY
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv,noheader
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:$(python3 -c 'import os,nvidia; print(":".join(os.path.join(d,"cu13","lib") for d in nvidia.__path__))')"
export FERROTUNE_CACHE_DIR=/tmp/ftcache NO_COLOR=1 RUST_BACKTRACE=1
d=/tmp/model-llama3-1b
[ -f $d/config.json ] || python3 .bench/make_model.py llama3-1b $d 2>&1 | tail -1
for i in 1 2; do for ck in false unsloth; do
  echo "-- 1b $ck $(date +%T)"
  nvidia-smi --query-gpu=clocks.sm,power.draw,utilization.gpu --format=csv,noheader,nounits -lms 200 > $out/smi-$ck-$i.csv &
  smi=$!
  timeout 150 /tmp/ferrotune bench --model_name $d --per_device_train_batch_size 2 --max_seq_length 2048 \
    --use_gradient_checkpointing $ck --device cuda --steps 40 2>&1 | grep RESULT | grep -oE '"(tokens_per_s|step_s_median|peak_gib)":[0-9.]+' | tr '\n' ' '; echo
  kill $smi
  python3 - $out/smi-$ck-$i.csv <<'PY'
import sys, statistics as st
rows=[l.split(',') for l in open(sys.argv[1]) if l.strip()]
rows=[(float(a),float(b),float(c)) for a,b,c in rows if float(c)>50]
print("busy samples", len(rows), "sm MHz median", st.median(r[0] for r in rows), "min", min(r[0] for r in rows), "W median", st.median(r[1] for r in rows), "util median", st.median(r[2] for r in rows))
PY
done; done
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null)
for ck in false unsloth; do
  echo "== ncu 1b $ck $(date +%T)"
  timeout 200 $NCU --clock-control none --metrics gpu__time_duration.sum,launch__grid_size --csv --print-units base \
    /tmp/ferrotune bench --model_name $d --per_device_train_batch_size 2 --max_seq_length 2048 \
    --use_gradient_checkpointing $ck --device cuda --warmup_steps 0 --steps 1 > $out/ncu-1b-$ck.csv 2>$out/ncu-1b-$ck.err
  echo "exit $?"
  python3 scripts/gpu/ncu_kernel_times.py --by-grid $out/ncu-1b-$ck.csv | head -45
done
rm -f $out/smi-*.csv
echo "done $(date +%T)"
