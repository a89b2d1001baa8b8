# Shared preamble of the GPU-machine call scripts (s18-* on): source it from
# the repository root. Sets the library path (CUDA 13's cuBLAS/cudart beside the torch venv's
# nvidia wheels), the kernel cache and plain logs, and defines:
#   unpack DIR NAME...   gpu-bin/DIR/NAME.xz -> /tmp/NAME (executable), linked as gpu-bin/NAME
#                        for scripts/gpu/cuda_checks.sh
#   model SHAPE          /tmp/model-SHAPE from .bench/make_model.py, once per machine
#   bench BIN SHAPE MODE [FLAGS...]
#                        one `ferrotune bench` at batch 2 x 2048, its RESULT fields on one line
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

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv,noheader
