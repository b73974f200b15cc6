"""scripts/quickstart.sh picks the torch build for the machine: the CPU build where no NVIDIA GPU
answers (a local wheel first, then PyTorch's CPU index with a short timeout), the default (CUDA)
build where one does. No GPU and no network here, so ``nvidia-smi`` and pip are stand-ins that
record how they were called: the function under test is the script's own ``install_torch``."""
from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, gpu: bool, local_wheel: bool, index_build: str = "cuda") -> tuple[int, list[str], str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if gpu:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200'\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    calls = tmp_path / "calls"
    reqs = '["filelock", "nvidia-cublas-cu12==12.8"]' if index_build == "cuda" else '["filelock"]'
    script = f"""
set -euo pipefail
eval "$(sed -n '/^TORCH_VERSION=/,/^TORCH_CPU_INDEX=/p;/^install_torch()/,/^}}/p' {ROOT}/scripts/quickstart.sh)"
python() {{  # pip stand-in: records its arguments; the local +cpu wheel exists or not; the plain
            # index's torch is a CPU or a CUDA build; `python -c` runs the real interpreter
  if [ "$1" = "-c" ]; then python3 "$@"; return; fi
  echo "$*" >> {calls}
  case "$*" in
    *extra-index-url*) return 1;;
    *+cpu*) [ {int(local_wheel)} = 1 ];;
    *--dry-run*) echo '{{"install": [{{"metadata": {{"requires_dist": {reqs}}}}}]}}';;
    *) return 0;;
  esac
}}
install_torch
"""
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                         env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    return out.returncode, calls.read_text().splitlines() if calls.exists() else [], out.stderr


def test_no_gpu_uses_the_local_cpu_wheel(tmp_path: Path):
    rc, calls, err = _run(tmp_path, gpu=False, local_wheel=True)
    assert rc == 0, err
    assert calls == ["-m pip install -q --timeout 20 --retries 1 torch==2.13.0+cpu"]


def test_no_gpu_index_with_an_untagged_cpu_build_uses_it(tmp_path: Path):
    rc, calls, err = _run(tmp_path, gpu=False, local_wheel=False, index_build="cpu")
    assert rc == 0, err
    assert "--dry-run" in calls[1] and calls[2] == "-m pip install -q --timeout 20 --retries 1 torch==2.13.0"


def test_no_gpu_no_cpu_build_tries_the_cpu_index_then_fails_clearly(tmp_path: Path):
    rc, calls, err = _run(tmp_path, gpu=False, local_wheel=False, index_build="cuda")
    assert len(calls) == 3 and "--dry-run" in calls[1]           # the CUDA build is never installed
    assert "--extra-index-url" in calls[2] and "torch==2.13.0+cpu" in calls[2] and "--timeout 20" in calls[2]
    assert rc == 2 and "could not install the CPU build" in err


def test_gpu_gets_the_default_build(tmp_path: Path):
    rc, calls, err = _run(tmp_path, gpu=True, local_wheel=False)
    assert rc == 0, err
    assert calls == ["-m pip install -q torch==2.13.0"]
