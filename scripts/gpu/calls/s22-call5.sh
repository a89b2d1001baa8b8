#!/usr/bin/env bash
# Session 22 call 5: correctness of HEAD (5fdc9ef, the key-pair kernels removed again; build
# gpu-bin/s22h): parity (every kernel check), the ladder (engine vs CPU engine, HF+PEFT parity),
# one bench-attn.
# Run from the repository root: bash scripts/gpu/calls/s22-call5.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s22h ferrotune parity cuda_parity
echo "== parity $(date +%T)"
timeout 120 /tmp/parity > $out/parity.log 2>&1; echo "exit $?"
grep -E "^(ok|FAIL) " $out/parity.log | awk '{print $1}' | sort | uniq -c
grep -E "ptxas attention/flash_bwd_d(64|128)_sm90|^FAIL|panicked" $out/parity.log | head -8
echo "== ladder $(date +%T)"
PARITY=1 timeout 150 bash scripts/gpu/cuda_checks.sh 2>&1 | grep -E "test result|PASS|FAIL|panicked" | tail -10
echo "== bench-attn $(date +%T)"
timeout 150 /tmp/parity --skip-checks --bench-attn 2>&1 | grep -E "^bench-attn |rror|panicked" | sed -E 's/ +/ /g'
echo "done $(date +%T)"
