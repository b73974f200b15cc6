#!/usr/bin/env bash
# Install the model-server runtime into the active Python environment (a venv).
#
#   docker/install-model-server.sh deps            torch, then the pinned stack (requirements-model-server.txt)
#   docker/install-model-server.sh app SRC_DIR     the edge-eval package from SRC_DIR, without dependencies
#   docker/install-model-server.sh all SRC_DIR     both
#
# Environment:
#   TORCH_VERSION   (default 2.13.0). The default Linux x86_64 wheel of torch 2.13.0 is built for
#                   CUDA 13.0 with kernels for sm_75 (T4) through sm_120, Hopper (sm_90) included;
#                   its CUDA libraries come as wheels, so it needs an NVIDIA driver >= 580.
#   TORCH_INDEX_URL optional: a wheel index for another torch build (e.g. an older CUDA line for older
#                   drivers, or the CPU build). Empty: the configured default index.
#   WITH_GPTQ       1 to add gptqmodel + optimum (requirements-gptq.txt; needs a compiler).
#   PYTHON          interpreter (default: python3 on PATH, i.e. the venv's).
# pip's cache: the image sets PIP_NO_CACHE_DIR=1 (Dockerfile); elsewhere (CI) the cache is reused.
# tests/test_deploy_docker.py runs this with the CPU torch build (never a CUDA build on CI).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python3}"
pip=("$py" -m pip --disable-pip-version-check --no-input --require-virtualenv)
step="${1:-}"; src="${2:-}"
torch_version="${TORCH_VERSION:-2.13.0}"

deps() {
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${pip[@]}" install --index-url "$TORCH_INDEX_URL" "torch==$torch_version"
  else
    "${pip[@]}" install "torch==$torch_version"
  fi
  # torch stays at the version just installed: pin it while resolving the rest.
  installed="$("$py" -c 'import importlib.metadata as m; print(m.version("torch"))')"
  "${pip[@]}" install -r "$here/requirements-model-server.txt" "torch==$installed"
  if [ "${WITH_GPTQ:-0}" = 1 ]; then
    "${pip[@]}" install -r "$here/requirements-gptq.txt" "torch==$installed"
  fi
}

app() {
  [ -n "$src" ] && [ -f "$src/pyproject.toml" ] || { echo "install-model-server.sh: SRC_DIR with pyproject.toml required" >&2; exit 2; }
  "${pip[@]}" install --no-deps "$src"
  "${pip[@]}" check
  "$py" -c "import torch, transformers, bitsandbytes, model_server, edge_proxy"
  ms_bin="$(dirname "$("$py" -c 'import sys; print(sys.executable)')")/model-server"
  "$ms_bin" --help >/dev/null
}

case "$step" in
  deps) deps ;;
  app) app ;;
  all) deps; app ;;
  *) echo "usage: install-model-server.sh deps | app SRC_DIR | all SRC_DIR" >&2; exit 2 ;;
esac
