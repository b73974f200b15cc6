#!/usr/bin/env bash
# Sets up a virtual environment in .venv (CPU torch, the package with its extras) and then
#   demo: runs `edge-proxy demo` (model server + proxy + load + live table of the five metrics)
#   test: installs Prometheus and nginx (Debian packages) when missing and runs the test suite (2 processes)
# Usage: bash scripts/quickstart.sh demo|test [extra args]
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"; shift || true
case "$mode" in demo|test|setup) ;; *) echo "usage: bash scripts/quickstart.sh demo|test|setup [args]" >&2; exit 2;; esac

TORCH_VERSION=2.13.0
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"

# torch for this machine: the CUDA build (the default wheel) only where an NVIDIA GPU answers;
# elsewhere the CPU build, from a local wheel when pip's configured sources have one (offline
# setups), else from PyTorch's CPU wheel index (short timeout: a clear error, never a hang).
install_torch() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "quickstart: NVIDIA GPU found: installing torch $TORCH_VERSION (CUDA build)" >&2
    python -m pip install -q "torch==$TORCH_VERSION"
    return
  fi
  echo "quickstart: no NVIDIA GPU: installing torch $TORCH_VERSION (CPU build)" >&2
  if python -m pip install -q --timeout 20 --retries 1 "torch==$TORCH_VERSION+cpu" 2>/dev/null; then
    return
  fi
  # an index that serves the CPU build without the +cpu tag: take it if it needs no nvidia-* wheels
  if python -m pip install -q --timeout 20 --retries 1 --dry-run --no-deps --report - "torch==$TORCH_VERSION" 2>/dev/null \
      | python -c 'import json,sys; r=json.load(sys.stdin)["install"][0]["metadata"].get("requires_dist") or []; sys.exit(any(x.startswith("nvidia-") for x in r))' 2>/dev/null; then
    python -m pip install -q --timeout 20 --retries 1 "torch==$TORCH_VERSION" && return
  fi
  python -m pip install -q --timeout 20 --retries 1 --extra-index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION+cpu" || {
    echo "quickstart: error: could not install the CPU build of torch $TORCH_VERSION (no local wheel, and the PyTorch CPU index did not answer)" >&2
    exit 2
  }
}

VENV="${EDGE_EVAL_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.edge-eval-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  if ! python -c "import torch" 2>/dev/null; then
    install_torch
  fi
  python -m pip install -q -e ".[server,eval,test]"
  # The TGI client pins huggingface-hub<1.0, which transformers 5 cannot share: no deps.
  python -m pip install -q --no-deps "text-generation==0.7.0"
  touch "$stamp"
fi

need_apt=()
if [ "$mode" = test ]; then
  command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

case "$mode" in
  demo) exec edge-proxy demo "$@" ;;
  # two pytest processes (pytest-xdist), each test file whole in one of them (its module fixtures start once);
  # most of the suite waits on servers it starts, so two share 2 cores well (extra args come last: -n 0 = one)
  test) exec python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile "$@" ;;
  setup) echo "environment ready in $VENV" ;;
esac
