#!/usr/bin/env bash
# Session 15 call 5: the offload's new fallback at long sequences (the attention output without
# q/k/v when the attention with them exceeds half the host's memory). 8B QLoRA + "unsloth",
# batch 1 × 64k: the new default against FERROTUNE_OFFLOAD=inputs (call 3's behaviour).
set -uo pipefail
out=${OUT:-/tmp}
# Run from the repository root: bash scripts/gpu/calls/s15-call5.sh (binaries in gpu-bin/s15/, built as docs/gpu.md says).
python3 -c 'import lzma,os; open("/tmp/ferrotune","wb").write(lzma.open("gpu-bin/s15/ferrotune.xz").read()); os.chmod("/tmp/ferrotune",0o755)'
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:$(python3 -c 'import os,nvidia; print(":".join(os.path.join(d,"cu13","lib") for d in nvidia.__path__))')"
export FERROTUNE_CACHE_DIR=/tmp/ftcache NO_COLOR=1 RUST_BACKTRACE=1
grep MemAvailable /proc/meminfo
d=/tmp/model-llama3-8b
[ -f $d/config.json ] || python3 .bench/make_model.py llama3-8b $d 2>&1 | tail -1
for mode in default inputs; do
  echo "-- $mode T=65536 $(date +%T)"
  if [ $mode = default ]; then unset FERROTUNE_OFFLOAD; else export FERROTUNE_OFFLOAD=$mode; fi
  timeout 170 /tmp/ferrotune bench --model_name $d --per_device_train_batch_size 1 --max_seq_length 65536 \
    --use_gradient_checkpointing unsloth --load_in_4bit --warmup_steps 1 --steps 1 --device cuda > $out/long-$mode.log 2>&1
  echo "rc $?"; grep -h RESULT $out/long-$mode.log | grep -oE '"(tokens_per_s|step_s_median|peak_gib|device_peak_gib)":[0-9.]+|"losses":\[[^]]*\]' | tr '\n' ' '; echo
  grep -E "offload|rror|panicked" $out/long-$mode.log | cut -c29-300 | head -3
done
echo "done $(date +%T)"
