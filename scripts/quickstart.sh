#!/usr/bin/env bash
# Sets up a virtual environment in .venv (CPU torch, the package with its extras) and then
#   demo: runs `edge-proxy demo` (model server + proxy + load + live table of the five metrics)
#   test: installs Prometheus and nginx (Debian packages) when missing and runs the test suite
# Usage: bash scripts/quickstart.sh demo|test [extra args]
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"; shift || true
case "$mode" in demo|test|setup) ;; *) echo "usage: bash scripts/quickstart.sh demo|test|setup [args]" >&2; exit 2;; esac

VENV="${EDGE_EVAL_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.edge-eval-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  # CPU build of torch from the machine's package index; never a multi-GB CUDA build here.
  if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==2.13.0"
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
  test) exec python -m pytest -q -p no:cacheprovider "$@" ;;
  setup) echo "environment ready in $VENV" ;;
esac
