#!/usr/bin/env bash
# Session 15 call 6: pre-quantised (bitsandbytes 4-bit) weights now upload through the pinned
# staging buffers. The ladder's cuda_parity (incl. prequantised_bnb_4bit_base_matches_quantising
# _on_the_gpu) and the real-bitsandbytes checkpoint checks (scripts/gpu/bnb4_base_checks.sh).
set -uo pipefail
out=${OUT:-/tmp}
# Run from the repository root: bash scripts/gpu/calls/s15-call6.sh (binaries in gpu-bin/s15/, built as docs/gpu.md says).
python3 - <<'PY'
import lzma, os
for n in ("ferrotune", "cuda_parity"):
    open(f"/tmp/{n}", "wb").write(lzma.open(f"gpu-bin/s15/{n}.xz").read()); os.chmod(f"/tmp/{n}", 0o755)
PY
mkdir -p gpu-bin && for n in ferrotune cuda_parity; do ln -sf /tmp/$n gpu-bin/$n; done
mkdir -p /tmp/site && tar xzf .bench/site.tgz -C /tmp/site
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:$(python3 -c 'import os,nvidia; print(":".join(os.path.join(d,"cu13","lib") for d in nvidia.__path__))')"
export FERROTUNE_CACHE_DIR=/tmp/ftcache NO_COLOR=1 RUST_BACKTRACE=1
echo "== cuda_parity $(date +%T)"
FERROTUNE_REQUIRE_GPU=1 timeout 150 /tmp/cuda_parity --nocapture --test-threads 1 > $out/cuda_parity.log 2>&1
echo "exit $?"; grep -E "^test |test result" $out/cuda_parity.log | grep -vE "GPU: " | tail -3; grep -E "^test .*(ok|FAILED)$" $out/cuda_parity.log | head -12
echo "== bnb4 base checks $(date +%T)"
PYTHONPATH=/tmp/site timeout 120 bash scripts/gpu/bnb4_base_checks.sh 2>&1 | tail -15
echo "exit $? done $(date +%T)"
