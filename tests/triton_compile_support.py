"""Shared by the Triton kernel tests: run a script that compiles a kernel for a GPU target (sm_90) with Triton's
compiler in a fresh interpreter, since the test session runs Triton's interpreter (``TRITON_INTERPRET=1``), which
runs a kernel's Python and never its compiler."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compile_lines(script: str, cache_dir: Path) -> list[str]:
    """The stdout lines of ``python -c script`` run from the repository root without the interpreter switch and with
    its own Triton cache (``cache_dir``); fails the test with the script's stderr if it exits non-zero."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.split("\n")
