#!/usr/bin/env bash
# On the GPU machine, from the repo root: tests/python/check_bnb4_base.py — real bitsandbytes
# 4-bit checkpoints (saved by transformers + bitsandbytes, double-quantised and plain absmax) load
# as ferrotune base models: `ferrotune export --save_method merged_16bit` from them equals
# bitsandbytes' dequantize_4bit bit for bit, and `ferrotune bench` trains on them on the GPU.
# The engine-level GPU check (codes, absmax, loss and LoRA gradients against --load_in_4bit) is
# `FERROTUNE_REQUIRE_GPU=1 cargo test -p ferrotune --features cuda --test cuda_parity prequantised`.
#
# Needs gpu-bin/ferrotune built with --features cuda from this commit, and python3 with torch,
# transformers, peft, safetensors and bitsandbytes (a wheel in gpu-bin/wheels/ is installed when
# the import fails, as in export_checks.sh). Logs go to $OUT (or /tmp). Exit 0 only on PASS.
set -uo pipefail
out=${OUT:-/tmp}
source scripts/gpu/lib.sh
find_ferrotune
install_bitsandbytes_if_missing
for mod in torch transformers peft safetensors bitsandbytes; do
  if ! python3 -c "import $mod" 2>/dev/null; then
    echo "MISSING: python package $mod is not installed on this machine; bnb4 base checks NOT RUN"
    exit 3
  fi
done
python3 -c 'import torch, transformers, bitsandbytes as b; print("torch", torch.__version__, "transformers", transformers.__version__, "bitsandbytes", b.__version__)'
PYTHONUNBUFFERED=1 python3 tests/python/check_bnb4_base.py "$bin" /tmp/bnb4-base-check 2>&1 | grep -vE "Warning|warn" | tee "$out/check_bnb4_base.log"
exit "${PIPESTATUS[0]}"
