#!/usr/bin/env bash
# Session 16 call 2: lora_tdb with a four-stage pipeline and the first B in the first commit
# group (the first build, call 1, had two stages).
# 1. parity --bench with the build's kernel and two source variants (NS 3; 4 CTAs per SM).
# 2. end to end, new build against session 15's, alternating: 8B no checkpointing and
#    "unsloth", 1B no checkpointing.
# 3. one 8B step of each build under ncu, summed by kernel and grid.
# 4. the ladder on the new build.
set -uo pipefail
out=${OUT:-/tmp}
# Run from the repository root: bash scripts/gpu/calls/s16-call2.sh (binaries in gpu-bin/s16/, built as docs/gpu.md says).
python3 - <<'PY'
import lzma, os
for n, src in (("ferrotune", "s16/ferrotune"), ("parity", "s16/parity"),
               ("cuda_parity", "s16/cuda_parity"), ("ferrotune-prev", "s15/ferrotune")):
    open(f"/tmp/{n}", "wb").write(lzma.open(f"gpu-bin/{src}.xz").read()); os.chmod(f"/tmp/{n}", 0o755)
PY
mkdir -p gpu-bin && for n in ferrotune parity cuda_parity; do ln -sf /tmp/$n gpu-bin/$n; done
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:$(python3 -c 'import os,nvidia; print(":".join(os.path.join(d,"cu13","lib") for d in nvidia.__path__))')"
export FERROTUNE_CACHE_DIR=/tmp/ftcache NO_COLOR=1 RUST_BACKTRACE=1
for v in "" gpu-bin/s16/v_ns3 gpu-bin/s16/v_lb4; do
  echo "== parity ${v:-build} $(date +%T)"
  FERROTUNE_KERNEL_SOURCE_DIR=$v timeout 120 /tmp/parity --bench > $out/parity-$(basename ${v:-build}).log 2>&1
  echo "exit $?"
  grep -E "^(ok|FAIL) " $out/parity-$(basename ${v:-build}).log | awk '{print $1}' | sort | uniq -c
  [ -z "$v" ] && grep -E "^(ok|FAIL) +lora_tdb" $out/parity-build.log
  grep -E "^FAIL|checks, [0-9]+ failed|^bench (lora|swiglu|rmsnorm_bwd)|panicked|rror|ptxas swiglu/lora_tdb_r16" $out/parity-$(basename ${v:-build}).log | head -20
done
for shape in llama3-8b llama3-1b; do
  d=/tmp/model-$shape
  [ -f $d/config.json ] || python3 .bench/make_model.py $shape $d 2>&1 | tail -1
done
run() {  # binary shape ckpt [kernel source dir]
  echo "-- $1 $2 $3 ${4:-} $(date +%T)"
  FERROTUNE_KERNEL_SOURCE_DIR=${4:-} timeout 150 /tmp/$1 bench --model_name /tmp/model-$2 --per_device_train_batch_size 2 \
    --max_seq_length 2048 --use_gradient_checkpointing $3 --device cuda > $out/bench-$1-$2-$3-$(date +%s).log 2>&1
  grep -h RESULT $out/bench-$1-$2-$3-*.log | tail -1 | grep -oE '"(tokens_per_s|step_s_median|peak_gib)":[0-9.]+|"losses":\[[^]]*\]' | tr '\n' ' '; echo
}
for i in 1 2; do
  for b in ferrotune-prev ferrotune; do run $b llama3-8b false; done
  for b in ferrotune ferrotune-prev; do run $b llama3-8b unsloth; done
  for b in ferrotune-prev ferrotune; do run $b llama3-1b false; done
done
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null)
echo "== ncu: $NCU $(date +%T)"
for b in ferrotune-prev ferrotune; do
  timeout 150 $NCU --clock-control none --metrics gpu__time_duration.sum,launch__grid_size --csv --print-units base \
    /tmp/$b bench --model_name /tmp/model-llama3-8b --per_device_train_batch_size 2 --max_seq_length 2048 \
    --use_gradient_checkpointing false --device cuda --warmup_steps 0 --steps 1 > $out/ncu-$b.csv 2>$out/ncu-$b.err
  echo "exit $?"
  python3 scripts/gpu/ncu_kernel_times.py --by-grid $out/ncu-$b.csv | head -40
done
echo "== ladder $(date +%T)"
PARITY=1 timeout 200 bash scripts/gpu/cuda_checks.sh 2>&1 | grep -E "test result|PASS|FAIL|panicked" | tail -10
echo "done $(date +%T)"
