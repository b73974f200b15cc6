"""benchmarks/wave_stall.py: the stall per wave of a steady-state run and the host time of a profiled burst, from
their JSON files, and one-line errors on files it cannot use."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "benchmarks" / "wave_stall.py")


def _run(*files: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *map(str, files)], capture_output=True, text=True, timeout=60)


def test_stall_and_host_time(tmp_path):
    ss = {"new_tokens": 100, "quants": [{"quant": "int4", "cells": [
        {"concurrency": 10, "tokens_per_second_median": 5000.0, "itl_p50_ms": 1.5}]}]}
    burst = {"quants": [{"quant": "bf16", "profile": {"kernel_ms_per_step": 12.5}, "cells": [
        {"prompts": 8, "ms_median": 9.0}, {"prompts": 64, "ms_median": 30.0}]}]}
    plain = {"quants": [{"quant": "int4", "cells": [{"prompts": 64, "ms_median": 22.6}]}]}     # no --profile
    (tmp_path / "ss.json").write_text(json.dumps(ss))
    (tmp_path / "b.json").write_text(json.dumps(burst))
    (tmp_path / "p.json").write_text(json.dumps(plain))
    r = _run(tmp_path / "ss.json", tmp_path / "b.json", tmp_path / "p.json")
    assert r.returncode == 0, r.stderr
    # 10 x 100 tokens at 5,000 tokens/s = 200 ms, less 100 steps x 1.5 ms
    assert "int4 c=10: wave 1000 tokens, stall 50.0 ms" in r.stdout
    assert "bf16 burst of 64: 30.0 ms, kernels 12.5 ms, host 17.5 ms" in r.stdout
    assert "int4 burst of 64: 22.6 ms\n" in r.stdout                      # the time alone without a profile


def test_files_it_cannot_use_are_one_line_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "empty.json").write_text(json.dumps({"quants": []}))
    for f, says in ((tmp_path / "missing.json", "cannot read it"), (tmp_path / "bad.json", "cannot read it"),
                    (tmp_path / "empty.json", "no steady-state cells")):
        r = _run(f)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr
