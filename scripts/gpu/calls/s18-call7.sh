#!/usr/bin/env bash
# Session 18 call 7: the RoPE stretch past the model's window on the cuda engine (build of
# 42e9430, gpu-bin/s18d/ferrotune.xz). The demo's tiny model (gpu-bin/s18d/w4096, carried) as
# copies with a 128- and a 256-token window; one step on 40 demo rows at --max_seq_length 256,
# on the cpu engine and on the GPU: w128 is stretched by 2, w256 is not.
# Run from the repository root: bash scripts/gpu/calls/s18-call7.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s18d ferrotune
for device in cpu cuda; do
  for w in 256 128; do
    echo "-- $device window $w"
    timeout 120 /tmp/ferrotune --model_name gpu-bin/s18d/w$w --dataset gpu-bin/s18d/data.jsonl \
      --max_seq_length 256 --max_steps 2 --warmup_steps 0 --per_device_train_batch_size 2 \
      --gradient_accumulation_steps 1 --device $device --report_to none --save_strategy no \
      --output_dir /tmp/out-$device-$w --save_path /tmp/save-$device-$w 2>&1 \
      | grep -E "stretched|step [12]/2|error" | sed -E 's/^.*(INFO|WARN) job: //'
  done
done
echo "done $(date +%T)"
