#!/usr/bin/env bash
# Multi-GPU data parallelism checks (issue 8), on a machine with 2+ GPUs, from the repo root,
# with gpu-bin/ferrotune (cargo build --profile gpu -p ferrotune --features cuda) and .bench/
# carried (make_model.py writes the random-weight models). Writes logs and JSON to $OUT.
#   1. curve: 1 GPU × GA 2 vs 2 GPUs × GA 1, same data and seed, 50 steps (Llama-3.2-1B shape);
#   2. resume: the 2-GPU run killed after its step-20 checkpoint, resumed on 1 GPU × GA 2 to
#      the end, vs the uninterrupted curve;
#   3. scaling: `ferrotune bench` on the Llama-3-8B shape, bs 2 × 2048 per GPU, 1 vs N GPUs.
set -uo pipefail
out=${OUT:-/tmp}
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:$(python3 -c 'import os,nvidia; print(":".join(os.path.join(d,"cu13","lib") for d in nvidia.__path__))')"
ldconfig -p | grep -E "libnccl" | head -2
export FERROTUNE_CACHE_DIR=/tmp/ftcache RUST_BACKTRACE=1 NCCL_NVLS_ENABLE=0
ngpu=$(nvidia-smi -L | wc -l)
ft=./gpu-bin/ferrotune

d1=/tmp/model-llama3-1b
[ -f $d1/config.json ] || python3 .bench/make_model.py llama3-1b $d1 2>&1 | tail -1
# Token rows with a learnable rule (the model's word-level vocabulary is t0..t128254).
python3 - <<'EOF'
import json, random
random.seed(7)
with open("/tmp/dp_data.jsonl", "w") as f:
    for i in range(4000):
        x = random.randrange(2000); toks = []
        for _ in range(random.randrange(40, 200)):
            toks.append(f"t{x}")
            x = (3 * x + 1) % 2000 if random.random() < 0.9 else random.randrange(2000)
        f.write(json.dumps({"text": " ".join(toks)}) + "\n")
EOF
common="--model_name $d1 --dataset /tmp/dp_data.jsonl --formatter text --max_seq_length 512
  --per_device_train_batch_size 4 --max_steps 50 --learning_rate 2e-4 --warmup_steps 5
  --logging_steps 1 --report_to none --save_strategy steps --save_steps 10 --device cuda
  --use_gradient_checkpointing false --log_format json"
run() { # name, extra args...
  local name=$1; shift
  /usr/bin/time -f "$name wall %e s" $ft $common --output_dir /tmp/dp-$name "$@" > $out/dp-$name.log 2>&1
  echo "$name exit $?"; tail -1 $out/dp-$name.log | cut -c1-300
}
run one --num_gpus 1 --gradient_accumulation_steps 2
run two --num_gpus 2 --gradient_accumulation_steps 1
# Killed mid-way: wait for checkpoint-20 to appear, then SIGKILL, then resume on 1 GPU.
( $ft $common --output_dir /tmp/dp-kill --num_gpus 2 --gradient_accumulation_steps 1 > $out/dp-kill-a.log 2>&1 ) &
pid=$!
for _ in $(seq 600); do [ -f /tmp/dp-kill/checkpoint-20/manifest.json ] && break; sleep 0.1; done
pkill -KILL -f "output_dir /tmp/dp-kill" ; wait $pid; echo "killed run exit $? (137 = SIGKILL); checkpoints: $(ls /tmp/dp-kill | tr '\n' ' ')"
run kill --num_gpus 1 --gradient_accumulation_steps 2 --resume
python3 - "$out" <<'EOF'
import json, sys
out = sys.argv[1]
def losses(name):
    s = json.load(open(f"/tmp/dp-{name}/trainer_state.json"))
    return {e["step"]: e["loss"] for e in s["log_history"] if "loss" in e}
one, two, kill = losses("one"), losses("two"), losses("kill")
res = {"steps": len(one), "first_loss": one[1], "last_loss": one[50]}
for name, other in (("two_gpus", two), ("killed_resumed", kill)):
    rel = [abs(other[k] - one[k]) / abs(one[k]) for k in one]
    res[name] = {"max_rel_diff": max(rel), "mean_rel_diff": sum(rel) / len(rel),
                 "last_loss": other[50], "steps": len(other)}
print("CURVES", json.dumps(res))
json.dump(res, open(f"{out}/dp_curves.json", "w"), indent=1)
EOF

d8=/tmp/model-llama3-8b
[ -f $d8/config.json ] || python3 .bench/make_model.py llama3-8b $d8 2>&1 | tail -1
for n in 1 $ngpu; do
  timeout 300 $ft bench --model_name $d8 --per_device_train_batch_size 2 --max_seq_length 2048 \
    --use_gradient_checkpointing ${CKPT:-false} --device cuda --num_gpus $n 2>&1 | tee -a $out/dp-bench.log | grep -E "RESULT|rror|panicked"
done
