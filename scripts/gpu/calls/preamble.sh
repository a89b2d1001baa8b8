# Shared preamble of the GPU-machine call scripts (s18-* on): source it from
# the repository root. Sets the library path (CUDA 13's cuBLAS/cudart beside the torch venv's
# nvidia wheels), the kernel cache and plain logs, and defines:
#   unpack DIR NAME...   gpu-bin/DIR/NAME.xz -> /tmp/NAME (executable), linked as gpu-bin/NAME
#                        for scripts/gpu/cuda_checks.sh
#   model SHAPE          /tmp/model-SHAPE from .bench/make_model.py, once per machine
#   bench BIN SHAPE MODE [FLAGS...]
#                        one `ferrotune bench` at batch 2 x 2048, its RESULT fields on one line
#   bench_json BIN SHAPE MODE [FLAGS...]
#                        the same, its whole RESULT line (the raw JSON docs/gpu.md keeps)
#   anchor SHAPE MODE... Unsloth / HF+PEFT (.bench/run_anchor.sh) at batch 2 x 2048, RESULT lines
#   check_parity NAME [FLAGS...]
#                        /tmp/parity FLAGS (the kernel checks) logged to $out/parity-NAME.log:
#                        exit status, ok/FAIL counts, the attention backward's ptxas lines, failures
#   ladder               the correctness ladder (cuda_parity, HF+PEFT parity), summarised
#   bench_attn           one `parity --skip-checks --bench-attn`, its timing lines
#   with_smi NAME CMD... CMD with nvidia-smi sampling every 200 ms, then the busy samples'
#                        median SM clock and power
#   ncu_step NAME BIN SHAPE MODE [FLAGS...]
#                        one step under ncu (kernel times at the real clocks) to $out/ncu-NAME.csv,
#                        summed by kernel and grid
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:$(python3 -c 'import os,nvidia; print(":".join(os.path.join(d,"cu13","lib") for d in nvidia.__path__))')"
export FERROTUNE_CACHE_DIR=/tmp/ftcache NO_COLOR=1 RUST_BACKTRACE=1
out=${OUT:-/tmp}

unpack() {
  local dir=$1
  shift
  python3 - "$dir" "$@" <<'PY'
import lzma, os, sys
d = sys.argv[1]
for n in sys.argv[2:]:
    open(f"/tmp/{n}", "wb").write(lzma.open(f"gpu-bin/{d}/{n}.xz").read())
    os.chmod(f"/tmp/{n}", 0o755)
PY
  mkdir -p gpu-bin
  for n in "$@"; do ln -sf "/tmp/$n" "gpu-bin/$n"; done
}

model() {
  [ -f "/tmp/model-$1/config.json" ] || python3 .bench/make_model.py "$1" "/tmp/model-$1" 2>&1 | tail -1
}

bench() {
  local bin=$1 shape=$2 mode=$3
  shift 3
  timeout 150 "$bin" bench --model_name "/tmp/model-$shape" --per_device_train_batch_size 2 \
    --max_seq_length 2048 --use_gradient_checkpointing "$mode" --device cuda "$@" 2>&1 | grep RESULT \
    | grep -oE '"(tokens_per_s|step_s_median|peak_gib|first_step_done_s)":[0-9.]+|"losses":\[[^]]*\]' \
    | tr '\n' ' '
  echo
}

bench_json() {
  local bin=$1 shape=$2 mode=$3
  shift 3
  timeout 150 "$bin" bench --model_name "/tmp/model-$shape" --per_device_train_batch_size 2 \
    --max_seq_length 2048 --use_gradient_checkpointing "$mode" --device cuda "$@" 2>&1 | grep RESULT
}

anchor() {
  local shape=$1
  shift
  timeout $((110 * $#)) bash .bench/run_anchor.sh "$shape" 2 2048 "$@" 2>&1 \
    | grep -E "^RESULT|failed|Error|error" | head -10
}

check_parity() {
  local name=$1
  shift
  timeout 150 /tmp/parity "$@" > "$out/parity-$name.log" 2>&1
  echo "exit $?"
  grep -E "^(ok|FAIL) " "$out/parity-$name.log" | awk '{print $1}' | sort | uniq -c
  grep -E "ptxas attention/flash_bwd_d(64|128)_sm90|^FAIL|panicked|rror" "$out/parity-$name.log" | head -8
}

ladder() {
  PARITY=1 timeout 200 bash scripts/gpu/cuda_checks.sh 2>&1 | grep -E "test result|PASS|FAIL|panicked" | tail -10
}

bench_attn() {
  timeout 150 /tmp/parity --skip-checks --bench-attn 2>&1 | grep -E "^bench-attn |rror|panicked" | sed -E 's/ +/ /g'
}

with_smi() {
  local name=$1 smi
  shift
  nvidia-smi --query-gpu=clocks.sm,power.draw,utilization.gpu --format=csv,noheader,nounits -lms 200 \
    > "$out/smi-$name.csv" &
  smi=$!
  "$@"
  kill $smi
  python3 - "$out/smi-$name.csv" <<'PY'
import statistics as st, sys
rows = [[float(x) for x in l.split(",")] for l in open(sys.argv[1]) if l.strip()]
busy = [r for r in rows if r[2] > 50]
if busy:
    print(f"busy samples {len(busy)} sm MHz median {st.median(r[0] for r in busy)}"
          f" min {min(r[0] for r in busy)} W median {st.median(r[1] for r in busy):.1f}")
else:
    print("no busy samples")
PY
}

ncu_step() {
  local name=$1 bin=$2 shape=$3 mode=$4 ncu
  shift 4
  ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null)
  timeout 200 "$ncu" --clock-control none --metrics gpu__time_duration.sum,launch__grid_size --csv \
    --print-units base "$bin" bench --model_name "/tmp/model-$shape" --per_device_train_batch_size 2 \
    --max_seq_length 2048 --use_gradient_checkpointing "$mode" --device cuda --warmup_steps 0 --steps 1 "$@" \
    > "$out/ncu-$name.csv" 2> "$out/ncu-$name.err"
  echo "exit $?"
  python3 scripts/gpu/ncu_kernel_times.py --by-grid "$out/ncu-$name.csv" | head -45
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv,noheader
