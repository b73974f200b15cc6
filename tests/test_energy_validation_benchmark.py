"""CPU smoke run of benchmarks/energy_validation.py (tiny model, estimated source, short phases).

The GPU runs of this benchmark are what docs/benchmarks.md quotes; this test keeps the benchmark's
own plumbing honest on CPU: every request of checks 2 and 3 must be found in the proxy's records
(it names them with x-request-id, which the proxy keeps as ``client_request_id``), so each check
computes a finite energy per request. On 2026-12-03 an H200 run of check 3 came back with
``mean nan J`` because the benchmark looked its requests up by the proxy's own id.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_energy_validation_quick_finds_every_request(tmp_path: Path, tiny_model_dir: str) -> None:
    out = tmp_path / "ev"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "energy_validation.py"), "--model-dir", tiny_model_dir,
         "--device", "cpu", "--quick", "--source", "estimated", "--only", "2,3", "--out", str(out)],
        capture_output=True, text=True, timeout=400)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]          # 1: a check's criterion missed
    checks = json.loads((out / "energy_validation.json").read_text())["checks"]
    three = checks["3_identical_concurrent"]
    assert three["requests"] == 16
    assert math.isfinite(three["mean_full_j"]) and three["mean_full_j"] > 0, three
    assert math.isfinite(three["max_relative_deviation"]), three
    assert all(ms is not None for ms in three["received_ms"]), three["received_ms"]
    two = checks["2_isolated_requests"]
    assert math.isfinite(two["max_relative_error"]), two
