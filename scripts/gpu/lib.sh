# Shared by the GPU-machine check scripts (source it from the repo root).

# Sets `bin` to the carried ferrotune binary: gpu-bin/ferrotune, else gpu-bin/ferrotune.xz
# unpacked to /tmp (the carry limit is 64 MiB, so the binary usually travels compressed).
find_ferrotune() {
  bin=./gpu-bin/ferrotune
  if [ ! -x "$bin" ] && [ -f gpu-bin/ferrotune.xz ]; then
    python3 -c 'import lzma,shutil; shutil.copyfileobj(lzma.open("gpu-bin/ferrotune.xz"), open("/tmp/ferrotune","wb"))'
    chmod +x /tmp/ferrotune && bin=/tmp/ferrotune
  fi
  if [ ! -x "$bin" ]; then
    echo "MISSING: gpu-bin/ferrotune (build it with --features cuda and carry gpu-bin/)"; exit 3
  fi
}

# bitsandbytes is not always in the image: install a carried wheel from gpu-bin/wheels/
# (`pip download bitsandbytes --no-deps -d gpu-bin/wheels`) when the import fails.
install_bitsandbytes_if_missing() {
  if ! python3 -c 'import bitsandbytes' 2>/dev/null && ls gpu-bin/wheels/bitsandbytes-*.whl >/dev/null 2>&1; then
    pip install --no-index --no-deps gpu-bin/wheels/bitsandbytes-*.whl 2>&1 | tail -1
  fi
}
