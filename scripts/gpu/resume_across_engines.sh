#!/usr/bin/env bash
# On the GPU machine, from the repo root, with gpu-bin/ferrotune built here
# (cargo build --profile gpu -p ferrotune --features cuda; see cuda_checks.sh for carrying it).
# Checks that a checkpoint moves between engines (engine/optimizer_state.rs: one optimizer-state
# format): a run checkpointed on the cuda engine resumes on the cpu engine and the other way
# round, for the on-device fp32 AdamW and for the host 8-bit AdamW. Passes when every line ends
# in "ok". Logs go to $OUT (or /tmp).
set -uo pipefail
out=${OUT:-/tmp}
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:$(python3 -c 'import os,nvidia; print(":".join(os.path.join(d,"cu13","lib") for d in nvidia.__path__))' 2>/dev/null)"
export FERROTUNE_CACHE_DIR=/tmp/ftcache RUST_BACKTRACE=1
w=/tmp/xengine
rm -rf $w && mkdir -p $w
# The demo builds its tiny Llama (hidden 128, head_dim 32: fine for the cuda engine) and dataset.
# (Two steps are too few for the demo's own "loss fell" check: only its files are used here.)
./gpu-bin/ferrotune demo --workdir $w/demo --max_steps 2 > $out/xengine-demo.log 2>&1
model=$(ls -d $w/demo/cache/*/ 2>/dev/null | head -1)
data=$w/demo/data/alpaca_demo.jsonl
[ -n "$model" ] && [ -f "$data" ] || { echo "demo wrote no model (see $out/xengine-demo.log)"; exit 1; }
run() { # out_dir device max_steps optim extra...
  local o=$1 dev=$2 steps=$3 optim=$4; shift 4
  # One GPU: --num_gpus defaults to every visible GPU, and the cpu run is one device, so on a
  # multi-GPU machine the two would differ in GA × devices (refused on resume, rightly).
  local gpus=""; [ "$dev" = cuda ] && gpus="--num_gpus 1"
  ./gpu-bin/ferrotune $gpus --model_name "$model" --dataset "$data" --output_dir "$o" --device "$dev" \
    --max_steps "$steps" --save_steps 3 --logging_steps 1 --max_seq_length 256 --r 8 \
    --lora_alpha 16 --per_device_train_batch_size 2 --optim "$optim" "$@"
}
for optim in adamw_torch adamw_8bit; do
  for pair in "cuda cpu" "cpu cuda"; do
    set -- $pair
    o=$w/$optim-$1-to-$2
    log=$out/xengine-$optim-$1-to-$2.log
    if run $o $1 3 $optim > $log 2>&1 && run $o $2 6 $optim --resume >> $log 2>&1 \
       && grep -q "resumed from .*checkpoint-3" $log && [ -d $o/checkpoint-6 ]; then
      echo "$optim: $1 checkpoint resumed on $2: ok"
    else
      echo "$optim: $1 checkpoint resumed on $2: FAILED (see $log)"; tail -3 $log
    fi
  done
done
