#!/usr/bin/env bash
# Install the edge-proxy runtime into the active Python environment (a venv).
#
#   docker/install-proxy.sh deps            pinned dependencies only (docker/requirements-proxy.txt)
#   docker/install-proxy.sh app SRC_DIR     the edge-eval package from SRC_DIR, without dependencies
#   docker/install-proxy.sh all SRC_DIR     both
#
# The Dockerfile's `proxy` target runs `deps` and `app` as two layers (dependencies change less
# often than the source). tests/test_deploy_docker.py runs `all` in a fresh venv and then starts the
# installed proxy, so these exact steps are known to work. Never installs torch or transformers.
# PYTHON selects the interpreter (default: python3 on PATH, i.e. the venv's).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python3}"
pip=("$py" -m pip --disable-pip-version-check --no-input --require-virtualenv)
step="${1:-}"; src="${2:-}"

deps() {
  "${pip[@]}" install --no-cache-dir -r "$here/requirements-proxy.txt"
}

app() {
  [ -n "$src" ] && [ -f "$src/pyproject.toml" ] || { echo "install-proxy.sh: SRC_DIR with pyproject.toml required" >&2; exit 2; }
  "${pip[@]}" install --no-cache-dir --no-deps "$src"
  # The proxy must run without the heavy stack: fail the build if anything pulled it in.
  if "$py" -c "import importlib.util, sys; sys.exit(0 if any(importlib.util.find_spec(m) for m in ('torch', 'transformers')) else 1)"; then
    echo "install-proxy.sh: torch or transformers ended up in the proxy environment" >&2; exit 1
  fi
  "${pip[@]}" check
  edge_bin="$(dirname "$("$py" -c 'import sys; print(sys.executable)')")/edge-proxy"
  "$edge_bin" --help >/dev/null
}

case "$step" in
  deps) deps ;;
  app) app ;;
  all) deps; app ;;
  *) echo "usage: install-proxy.sh deps | app SRC_DIR | all SRC_DIR" >&2; exit 2 ;;
esac
