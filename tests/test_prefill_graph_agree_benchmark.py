"""``benchmarks/prefill_graph_agree.py`` on CPU (tiny model, where every cap runs eagerly): greedy tokens of concurrent
requests per prefill graph cap and quantization, compared with the first cap's and between an engine's two rounds."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from prefill_graph_agree import differ  # noqa: E402


def test_differ_counts_requests_whose_tokens_differ():
    a = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert differ(a, [list(x) for x in a]) == 0
    assert differ(a, [[1, 2, 3], [4, 5, 0], [7, 8, 9]]) == 1
    assert differ(a, [[1, 2, 3], [4, 5, 6]]) == 1                  # a missing request counts as a difference


def test_tokens_per_cap_and_quantization(tmp_path):
    out = tmp_path / "pga"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "prefill_graph_agree.py"), "--preset", "tiny", "--quants",
           "bf16,int4", "--caps", "64,256", "--streams", "4", "--prompt-len", "16", "--new-tokens", "3",
           "--out", str(out), "--commit", "abc1234"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "prefill_graph_agree.json").read_text())
    assert rep["commit"] == "abc1234" and rep["card"] == "cpu" and rep["caps"] == [64, 256]
    assert list(rep["quants"]) == ["bf16", "int4"]
    for q in rep["quants"].values():
        assert set(q["compare"]) == {"64", "256"}
        for cap, toks in q["tokens"].items():
            assert len(toks) == 4 and all(len(t) == 3 for t in toks)
            assert q["compare"][cap] == {"rounds_differ": 0, "vs_first_cap_differ": 0}    # eager either way on CPU
    assert "int4 cap 256: 0 of 4 requests differ from cap 64" in r.stdout


def test_bad_caps_are_a_one_line_error(tmp_path):
    for caps in ("a,b", "2048", "8,4096"):
        r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prefill_graph_agree.py"), "--preset", "tiny",
                            "--caps", caps, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "--caps" in r.stderr.strip().splitlines()[-1]
