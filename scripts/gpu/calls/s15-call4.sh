#!/usr/bin/env bash
# Session 15 call 4: the 24 GiB boundaries at batch 1, 8B QLoRA + "unsloth" checkpointing:
# Unsloth at 72k (its 64k took 22.64 GiB in call 3), ours at 86k (80k: 22.53, 88k: 24.16 GiB).
set -uo pipefail
out=${OUT:-/tmp}
# Run from the repository root: bash scripts/gpu/calls/s15-call4.sh (binaries in gpu-bin/s15/, built as docs/gpu.md says).
python3 -c 'import lzma,os; open("/tmp/ferrotune","wb").write(lzma.open("gpu-bin/s15/ferrotune.xz").read()); os.chmod("/tmp/ferrotune",0o755)'
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:$(python3 -c 'import os,nvidia; print(":".join(os.path.join(d,"cu13","lib") for d in nvidia.__path__))')"
export FERROTUNE_CACHE_DIR=/tmp/ftcache NO_COLOR=1 RUST_BACKTRACE=1
d=/tmp/model-llama3-8b
[ -f $d/config.json ] || python3 .bench/make_model.py llama3-8b $d 2>&1 | tail -1
echo "-- unsloth T=73728 $(date +%T)"
STEPS=1 timeout 280 bash .bench/run_anchor.sh llama3-8b 1 73728 unsloth-4bit-ckpt 2>&1 | grep -vE "^NVIDIA"
for T in 88064; do
  echo "-- ferrotune T=$T $(date +%T)"
  timeout 170 /tmp/ferrotune bench --model_name $d --per_device_train_batch_size 1 --max_seq_length $T \
    --use_gradient_checkpointing unsloth --load_in_4bit --warmup_steps 1 --steps 1 --device cuda > $out/long-ours-$T.log 2>&1
  echo "rc $?"; grep -h RESULT $out/long-ours-$T.log | grep -oE '"(tokens_per_s|step_s_median|peak_gib|device_peak_gib)":[0-9.]+' | tr '\n' ' '; echo
  grep -E "WARN|rror|panicked" $out/long-ours-$T.log | cut -c1-250 | head -3
done
echo "done $(date +%T)"
