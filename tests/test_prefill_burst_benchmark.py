"""``benchmarks/prefill_burst.py`` on CPU (tiny model): bursts of prompts prefilled together, timed per size, with the
engine's prefill passes and the report's card, date, command and commit."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bursts_are_timed_per_size_and_quantization(tmp_path):
    out = tmp_path / "pb"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "prefill_burst.py"), "--preset", "tiny", "--quants", "bf16,int4",
           "--bursts", "1,3", "--reps", "2", "--warm", "1", "--out", str(out), "--commit", "abc1234"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "prefill_burst.json").read_text())
    assert rep["commit"] == "abc1234" and rep["card"] == "cpu" and "prefill_burst.py" in rep["command"]
    assert [e["quant"] for e in rep["quants"]] == ["bf16", "int4"]
    for e in rep["quants"]:
        assert [c["prompts"] for c in e["cells"]] == [1, 3]
        for c in e["cells"]:
            assert 0 < c["ms_min"] <= c["ms_median"] <= c["ms_max"] and c["prefill_passes_median"] >= 1
            assert c["tokens"] == c["prompts"] * 64
    assert "| int4 | 3 |" in r.stdout


def test_bad_bursts_are_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prefill_burst.py"), "--out", str(tmp_path),
                        "--bursts", "a,b"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--bursts takes comma-separated integers" in r.stderr and "Traceback" not in r.stderr
