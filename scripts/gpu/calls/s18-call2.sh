#!/usr/bin/env bash
# Session 18 call 2: A/B of call 1's build, alternating: session 17's build (gpu-bin/s17b), this
# build (the inverse RoPE folded into the dQ conversion), and this build with the LM-head chunk
# sized to the MLP buffer (FERROTUNE_CE_ROWS=fit, 896 rows on 8B instead of 512; experiment).
# Run from the repository root: bash scripts/gpu/calls/s18-call2.sh
set -uo pipefail
source scripts/gpu/calls/preamble.sh
unpack s17b ferrotune && mv /tmp/ferrotune /tmp/ferrotune-prev
unpack s18 ferrotune
model llama3-8b; model llama3-1b
for round in 1 2; do
  for m in "llama3-8b false" "llama3-8b unsloth" "llama3-8b unsloth --load_in_4bit"; do
    set -- $m
    echo "-- prev $* $(date +%T)"; bench /tmp/ferrotune-prev "$@"
    echo "-- new  $* $(date +%T)"; bench /tmp/ferrotune "$@"
    echo "-- fit  $* $(date +%T)"; FERROTUNE_CE_ROWS=fit bench /tmp/ferrotune "$@"
  done
  for m in "llama3-1b false" "llama3-1b unsloth"; do
    set -- $m
    echo "-- prev $* $(date +%T)"; bench /tmp/ferrotune-prev "$@"
    echo "-- new  $* $(date +%T)"; bench /tmp/ferrotune "$@"
  done
done
echo "done $(date +%T)"
