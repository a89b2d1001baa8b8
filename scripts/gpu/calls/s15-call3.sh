#!/usr/bin/env bash
# Session 15 call 3: the final build (4409775) verified — attention parity of both Hopper
# backward kernels + bench-attn, the ladder — then the longest 8B QLoRA sequence at batch 1
# within 24 GiB: ours at 64k/80k/88k, Unsloth at 64k/72k ("unsloth" checkpointing, NF4).
set -uo pipefail
out=${OUT:-/tmp}
# Run from the repository root: bash scripts/gpu/calls/s15-call3.sh (binaries in gpu-bin/s15/, built as docs/gpu.md says).
t0=$(date +%s)
python3 - <<'PY'
import lzma, os
for n in ("ferrotune", "parity", "cuda_parity"):
    open(f"/tmp/{n}", "wb").write(lzma.open(f"gpu-bin/s15/{n}.xz").read()); os.chmod(f"/tmp/{n}", 0o755)
PY
mkdir -p gpu-bin && for n in ferrotune parity cuda_parity; do ln -sf /tmp/$n gpu-bin/$n; done
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:$(python3 -c 'import os,nvidia; print(":".join(os.path.join(d,"cu13","lib") for d in nvidia.__path__))')"
export FERROTUNE_CACHE_DIR=/tmp/ftcache NO_COLOR=1 RUST_BACKTRACE=1
echo "== parity $(date +%T)"
timeout 200 /tmp/parity --attn-only --bench-attn > $out/flash_parity.log 2>&1
echo "exit $?"
grep -E "^(ok|FAIL) .*flash_bwd" $out/flash_parity.log | sed -E 's/^(ok|FAIL) +flash_bwd\[([a-z]+)\].*/\1 \2/' | sort | uniq -c
grep -E "^FAIL|checks, [0-9]+ failed|^bench-attn|panicked|rror" $out/flash_parity.log | sed 's/(CUDA.*//'
echo "== ladder $(date +%T)"
PARITY=1 timeout 200 bash scripts/gpu/cuda_checks.sh 2>&1 | grep -E "test result|PASS|FAIL|panicked" | tail -5
d=/tmp/model-llama3-8b
[ -f $d/config.json ] || python3 .bench/make_model.py llama3-8b $d 2>&1 | tail -1
for T in 65536 81920 90112; do
  echo "-- ferrotune T=$T $(date +%T)"
  timeout 170 /tmp/ferrotune bench --model_name $d --per_device_train_batch_size 1 --max_seq_length $T \
    --use_gradient_checkpointing unsloth --load_in_4bit --warmup_steps 1 --steps 1 --device cuda > $out/long-ours-$T.log 2>&1
  echo "rc $?"; grep -h RESULT $out/long-ours-$T.log | grep -oE '"(tokens_per_s|step_s_median|peak_gib|device_peak_gib)":[0-9.]+' | tr '\n' ' '; echo
  grep -iE "error|panicked" $out/long-ours-$T.log | head -3
done
for T in 65536 73728; do
  el=$(( $(date +%s) - t0 ))
  if [ $el -gt 380 ]; then echo "skip Unsloth T=$T (elapsed ${el}s)"; continue; fi
  echo "-- unsloth T=$T $(date +%T)"
  STEPS=1 timeout 200 bash .bench/run_anchor.sh llama3-8b 1 $T unsloth-4bit-ckpt 2>&1 | grep -vE "^NVIDIA"
done
echo "done $(date +%T)"
