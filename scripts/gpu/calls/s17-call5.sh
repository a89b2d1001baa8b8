#!/usr/bin/env bash
# Session 17 call 5 (diagnostic, HEAD 84fe429's build): where the 8B checkpointed steps go —
# one step of "unsloth" and of QLoRA + "unsloth" under ncu, summed by kernel and grid, and each
# mode timed with nvidia-smi sampling clock and power.
# Run from the repository root: bash scripts/gpu/calls/s17-call5.sh (binaries in gpu-bin/s17b/).
set -uo pipefail
out=${OUT:-/tmp}
python3 -c "
import lzma, os
open('/tmp/ferrotune','wb').write(lzma.open('gpu-bin/s17b/ferrotune.xz').read()); os.chmod('/tmp/ferrotune',0o755)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv,noheader
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:$(python3 -c 'import os,nvidia; print(":".join(os.path.join(d,"cu13","lib") for d in nvidia.__path__))')"
export FERROTUNE_CACHE_DIR=/tmp/ftcache NO_COLOR=1 RUST_BACKTRACE=1
d=/tmp/model-llama3-8b
[ -f $d/config.json ] || python3 .bench/make_model.py llama3-8b $d 2>&1 | tail -1
for q in "" --load_in_4bit; do
  echo "-- 8b unsloth $q $(date +%T)"
  nvidia-smi --query-gpu=clocks.sm,power.draw,utilization.gpu --format=csv,noheader,nounits -lms 200 > $out/smi.csv &
  smi=$!
  timeout 150 /tmp/ferrotune bench --model_name $d --per_device_train_batch_size 2 --max_seq_length 2048 \
    --use_gradient_checkpointing unsloth $q --device cuda --steps 20 2>&1 | grep RESULT | grep -oE '"(tokens_per_s|step_s_median|peak_gib)":[0-9.]+' | tr '\n' ' '; echo
  kill $smi
  python3 - $out/smi.csv <<'PY'
import sys, statistics as st
rows=[l.split(',') for l in open(sys.argv[1]) if l.strip()]
rows=[(float(a),float(b),float(c)) for a,b,c in rows if float(c)>50]
print("busy samples", len(rows), "sm MHz median", st.median(r[0] for r in rows), "min", min(r[0] for r in rows), "W median", st.median(r[1] for r in rows))
PY
done
rm -f $out/smi.csv
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null)
for q in "" --load_in_4bit; do
  name=unsloth${q:+-4bit}
  echo "== ncu 8b $name $(date +%T)"
  timeout 200 $NCU --clock-control none --metrics gpu__time_duration.sum,launch__grid_size --csv --print-units base \
    /tmp/ferrotune bench --model_name $d --per_device_train_batch_size 2 --max_seq_length 2048 \
    --use_gradient_checkpointing unsloth $q --device cuda --warmup_steps 0 --steps 1 > $out/ncu-8b-$name.csv 2>$out/ncu-8b-$name.err
  echo "exit $?"
  python3 scripts/gpu/ncu_kernel_times.py --by-grid $out/ncu-8b-$name.csv | head -30
done
echo "done $(date +%T)"
