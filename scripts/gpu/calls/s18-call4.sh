#!/usr/bin/env bash
# Session 18 call 4: out-of-memory errors explained (engine/cuda/oom.rs) and the RoPE kernels
# sharing their lane setup (rope.cu), build gpu-bin/s18b.
# 1. parity and the ladder (the RoPE kernels changed shape, not arithmetic)
# 2. a batch whose activations cannot fit (8B, 8 x 16384 tokens, no checkpointing)
# 3. a model that cannot load: torch holds all but 10 GiB of the GPU, then 8B in bf16, then
#    8B with --load_in_4bit beside the same hog (fits: the 4-bit weights take ≈ 5 GiB)
# 4. 1B and 8B "unsloth" once each, against call 3's times
# Run from the repository root: bash scripts/gpu/calls/s18-call4.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s18b ferrotune parity cuda_parity
echo "== parity $(date +%T)"
timeout 120 /tmp/parity > $out/parity.log 2>&1; echo "exit $?"
grep -E "^(ok|FAIL) " $out/parity.log | awk '{print $1}' | sort | uniq -c
grep -E "^FAIL|checks, [0-9]+ failed|panicked" $out/parity.log | head -20
grep -E "^ok +rope_apply" $out/parity.log | head -4
echo "== ladder $(date +%T)"
PARITY=1 timeout 240 bash scripts/gpu/cuda_checks.sh 2>&1 | grep -E "test result|PASS|FAIL|panicked" | tail -10
model llama3-8b; model llama3-1b
echo "== batch too large $(date +%T)"
timeout 120 /tmp/ferrotune bench --model_name /tmp/model-llama3-8b --per_device_train_batch_size 8 \
  --max_seq_length 16384 --use_gradient_checkpointing false --device cuda --steps 1 > $out/oom-batch.log 2>&1
echo "exit $?"; grep -E "^error" $out/oom-batch.log
echo "== model too large $(date +%T)"
python3 - <<'PY' &
import time, torch
free, _ = torch.cuda.mem_get_info()
hog = torch.empty(free - (10 << 30), dtype=torch.uint8, device="cuda")
print(f"hog holds {hog.numel() / 2**30:.1f} GiB; {torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB left", flush=True)
open("/tmp/hog-ready", "w").close()
time.sleep(120)
PY
hog=$!
for _ in $(seq 60); do [ -f /tmp/hog-ready ] && break; sleep 1; done
timeout 120 /tmp/ferrotune bench --model_name /tmp/model-llama3-8b --use_gradient_checkpointing unsloth \
  --device cuda --steps 1 > $out/oom-load.log 2>&1
echo "exit $?"; grep -E "^error" $out/oom-load.log
echo "-- the same with --load_in_4bit beside the hog"
timeout 120 /tmp/ferrotune bench --model_name /tmp/model-llama3-8b --use_gradient_checkpointing unsloth \
  --load_in_4bit --device cuda --steps 1 > $out/oom-load-4bit.log 2>&1
echo "exit $?"; grep -E "^error|RESULT" $out/oom-load-4bit.log | cut -c1-300
kill $hog; wait $hog 2>/dev/null
echo "== timing $(date +%T)"
echo "-- 8b unsloth"; bench /tmp/ferrotune llama3-8b unsloth
echo "-- 1b false"; bench /tmp/ferrotune llama3-1b false
echo "done $(date +%T)"
