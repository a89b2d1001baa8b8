#!/usr/bin/env bash
# On the GPU machine, from the repo root (each script's docstring says what it checks):
# - tests/python/check_peft_merged.py: our PEFT adapter loads with peft onto the base and our
#   merged_16bit save with transformers (fp32 on the GPU); both give the loss ferrotune itself
#   reports for the same rows, and the merged weights equal peft's own merge rounded to bf16;
# - tests/python/check_bnb4.py: our merged_4bit save loads with transformers + bitsandbytes
#   (CUDA) and matches bitsandbytes' own NF4 quantisation of the merged_16bit save.
# Exit 0 only when both pass.
#
# Needs gpu-bin/ferrotune (or gpu-bin/ferrotune.xz) built from this commit; the cuda feature is not
# needed for export: `cargo build --release -p ferrotune` (or --profile gpu --features cuda).
# Needs python3 with torch, transformers, peft and bitsandbytes. bitsandbytes is not always in the
# image: a wheel in gpu-bin/wheels/ (`pip download bitsandbytes --no-deps -d gpu-bin/wheels`) is
# installed from there when the import fails. Logs go to $OUT (or /tmp).
set -uo pipefail
out=${OUT:-/tmp}
source scripts/gpu/lib.sh
find_ferrotune
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
install_bitsandbytes_if_missing
for mod in torch transformers peft; do
  if ! python3 -c "import $mod" 2>/dev/null; then
    echo "MISSING: python package $mod is not installed on this machine; export checks NOT RUN"
    exit 3
  fi
done
python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
PYTHONUNBUFFERED=1 python3 tests/python/check_peft_merged.py "$bin" /tmp/peft-merged-check 2>&1 | grep -vE "Warning|warn|Loading weights|Writing model" | tee "$out/check_peft_merged.log"
peft_rc=${PIPESTATUS[0]}
if ! python3 -c "import bitsandbytes" 2>/dev/null; then
  echo "MISSING: python package bitsandbytes is not installed on this machine; merged_4bit check NOT RUN"
  exit 3
fi
python3 -c 'import bitsandbytes as b; print("bitsandbytes", b.__version__)'
PYTHONUNBUFFERED=1 python3 tests/python/check_bnb4.py "$bin" /tmp/bnb4-check 2>&1 | grep -vE "Warning|warn" | tee "$out/check_bnb4.log"
bnb_rc=${PIPESTATUS[0]}
echo "check_peft_merged exit $peft_rc, check_bnb4 exit $bnb_rc"
[ "$peft_rc" -eq 0 ] && [ "$bnb_rc" -eq 0 ]
