#!/usr/bin/env bash
# Verifies the model server's GPTQ path end to end on CPU, in a THROW-AWAY virtual environment
# (gptqmodel downgrades numpy, so it never goes into the project's .venv):
#   creates the venv (CPU torch first, then the package with [server] + gptqmodel + optimum + openai),
#   synthesizes the tiny model, quantizes it to GPTQ 4-bit (group 32) with gptqmodel, serves it with
#   `model-server serve --quantization gptq` and with the default `--quantization none`, sends a streamed
#   OpenAI completion and a TGI /generate to each, compares the greedy tokens with plain
#   `AutoModelForCausalLM.from_pretrained(...).generate`, checks /info (quantization, weight_bytes); checks the
#   fast engine's GPTQ repack (model_server/int4_repack.py) bit for bit against gptqmodel's dequantized weights
#   and serves the checkpoint with --engine fast.
# Exit status: 0 when every check passed, 1 otherwise. Not part of the test suite (about 1-3 minutes).
# Usage: bash scripts/check_gptq.sh [--keep-venv] [--work DIR]
#   GPTQ_CHECK_VENV (default /tmp/edge-eval-gptq-venv): where the venv goes; reused when --keep-venv.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
venv="${GPTQ_CHECK_VENV:-/tmp/edge-eval-gptq-venv}"
work="/tmp/edge-eval-gptq-check"
keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --keep-venv) keep=1; shift ;;
    --work) work="${2:?--work needs a directory}"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "check_gptq.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
  esac
done
name=check_gptq.sh
# shellcheck source=scripts/throwaway_venv.sh
. "$repo/scripts/throwaway_venv.sh"
tv_refuse_project_venv
trap tv_remove_unless_kept EXIT

export GPTQMODEL_CPU_WORKERS="${GPTQMODEL_CPU_WORKERS:-2}"
t0=$(date +%s)
if tv_needs_create; then
  echo "creating throw-away venv $venv ..."
  tv_create
  # CPU torch first, so gptqmodel's torch requirement never pulls a CUDA build.
  tv_pip_install "torch==2.13.0"
  tv_pip_install -e "$repo[server]" "gptqmodel==7.6.0" "optimum==2.3.0" "openai>=1.40"
  "$venv/bin/python" -c "import torch, gptqmodel, optimum, openai" >/dev/null 2>&1 \
    || { echo "check_gptq.sh: FAILED: the venv does not import torch/gptqmodel/optimum/openai" >&2; exit 1; }
fi
echo "venv ready in $(( $(date +%s) - t0 )) s"
mkdir -p "$work"
# the venv's bin first: `model-server` must be the venv's console script
# run from the work directory: gptqmodel writes a logs/ folder into the current one
(cd "$work" && PATH="$venv/bin:$PATH" "$venv/bin/python" "$repo/scripts/check_gptq.py" --work "$work" \
  2>"$work/check-stderr.log")
