#!/usr/bin/env bash
# Fill .gpu/.whl with the wheels the GPU device's image lacks (benchmarks/gpu_calls.sh installs them there):
# rouge-score, nltk, OpenTelemetry, GemLite (pure Python and Triton), and bitsandbytes 0.50.2 slimmed to the libraries a
# CUDA 13 torch loads.
# The device tool copies the working tree plus what is carried, 64 MiB in all; bitsandbytes' wheel holds one library
# per CUDA/ROCm/XPU release (43 MB), of which the image's torch (a CUDA 13.0 build) loads libbitsandbytes_cuda130.so:
# the carried wheel keeps cpu, cuda130 and cuda132 (about 7 MB), repacked with `wheel pack` (RECORD rewritten).
# Usage, with a network, from the repository root: bash scripts/gpu_wheels.sh [PYTHON]   (PYTHON: one with pip)
set -euo pipefail
py=${1:-python3}
dest=.gpu/.whl
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$dest"
"$py" -m pip install -q wheel
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 \
  -d "$dest" nltk==3.10.4 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
"$py" -m pip wheel -q --no-deps -w "$dest" rouge-score==0.1.2
"$py" -m pip wheel -q --no-deps -w "$dest" gemlite==0.6.0.post2   # Triton kernels only (benchmarks/gemlite_probe.py)
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 \
  -d "$tmp" bitsandbytes==0.50.2
"$py" -m wheel unpack -d "$tmp/u" "$tmp"/bitsandbytes-*.whl >/dev/null
find "$tmp"/u/bitsandbytes-*/bitsandbytes -maxdepth 1 -name 'libbitsandbytes_*.so' \
  ! -name '*_cpu.so' ! -name '*_cuda130.so' ! -name '*_cuda132.so' -delete
rm -f "$dest"/bitsandbytes-*.whl
"$py" -m wheel pack -d "$dest" "$tmp"/u/bitsandbytes-* >/dev/null
du -sh "$dest"
