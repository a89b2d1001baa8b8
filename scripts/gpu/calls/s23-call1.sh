#!/usr/bin/env bash
# Session 23 call 1: every issue-7 target side by side with Unsloth in one call, HEAD's build
# (gpu-bin/s23: the kernels of session 21's §34, unchanged since) — session 20 call 4's protocol:
# the kernel checks first (a wrong build would make the rest moot), then the anchor benchmark's
# three 8B modes and ours twice per mode, its two 1B modes and ours twice per mode. Unsloth's
# second 1B reading, the ladder and the profile follow in call 2 (one call holds at most 600 s).
# Run from the repository root: bash scripts/gpu/calls/s23-call1.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s23 ferrotune parity
echo "== parity $(date +%T)"
check_parity all
echo "== Unsloth 8B $(date +%T)"
anchor llama3-8b unsloth unsloth-ckpt unsloth-4bit-ckpt
for i in 1 2; do
  for mode in false unsloth "unsloth --load_in_4bit"; do
    echo "-- ferrotune llama3-8b $mode $(date +%T)"
    # shellcheck disable=SC2086 # the mode's flag splits on purpose
    bench_json /tmp/ferrotune llama3-8b $mode
  done
done
echo "== Unsloth 1B $(date +%T)"
anchor llama3-1b unsloth unsloth-ckpt
for i in 1 2; do
  for mode in false unsloth; do
    echo "-- ferrotune llama3-1b $mode $(date +%T)"
    bench_json /tmp/ferrotune llama3-1b $mode
  done
done
echo "done $(date +%T)"
