#!/usr/bin/env bash
# Session 18 call 1: the inverse RoPE folded into the attention backward's dQ conversion
# (`rope_dq_convert`, perf-notes §30), and an experiment sizing the LM-head chunk to the MLP
# buffer (FERROTUNE_CE_ROWS=fit, 896 rows on 8B instead of 512).
# 1. parity (every kernel check; the attention backward now also with the rotation folded in)
# 2. the ladder (engine vs CPU engine, HF+PEFT parity)
# 3. one 1B step under ncu, both builds (gpu-bin/s17b = session 17's): the kernel sums
# (the A/B of the step times is call 2)
# Run from the repository root: bash scripts/gpu/calls/s18-call1.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s17b ferrotune && mv /tmp/ferrotune /tmp/ferrotune-prev
unpack s18 ferrotune parity cuda_parity
echo "== parity $(date +%T)"
timeout 120 /tmp/parity > $out/parity.log 2>&1; echo "exit $?"
grep -E "^(ok|FAIL) " $out/parity.log | awk '{print $1}' | sort | uniq -c
grep -E "^FAIL|checks, [0-9]+ failed|panicked" $out/parity.log | head -20
grep -E "\+rope" $out/parity.log | head -4
echo "== ladder $(date +%T)"
PARITY=1 timeout 240 bash scripts/gpu/cuda_checks.sh 2>&1 | grep -E "test result|PASS|FAIL|panicked" | tail -10
model llama3-1b
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null)
for bin in ferrotune-prev ferrotune; do
  echo "== ncu $bin 1b false $(date +%T)"
  timeout 150 $NCU --clock-control none --metrics gpu__time_duration.sum,launch__grid_size --csv --print-units base \
    /tmp/$bin bench --model_name /tmp/model-llama3-1b --per_device_train_batch_size 2 --max_seq_length 2048 \
    --use_gradient_checkpointing false --device cuda --warmup_steps 0 --steps 1 > $out/ncu-$bin.csv 2>$out/ncu-$bin.err
  echo "exit $?"
  python3 scripts/gpu/ncu_kernel_times.py --by-grid $out/ncu-$bin.csv | head -4
  python3 scripts/gpu/ncu_kernel_times.py --by-grid $out/ncu-$bin.csv | grep -E "rope|dq_convert"
done
echo "done $(date +%T)"
