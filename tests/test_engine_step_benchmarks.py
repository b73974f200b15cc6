"""``benchmarks/mixed_step.py`` and ``benchmarks/host_step.py`` on CPU (tiny model): each writes its report
with the date and commit, and the numbers it exists for are there and consistent."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, *args], check=True, timeout=600, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc.stdout


def test_mixed_step_smoke(tmp_path, tiny_model_dir):
    out = tmp_path / "ms"
    _run([str(ROOT / "benchmarks" / "mixed_step.py"), "--device", "cpu", "--model-dir", tiny_model_dir,
          "--batch", "4", "--reps", "2", "--long", "2", "--short", "4", "--every", "2", "--commit", "abc1234",
          "--out", str(out)])
    r = json.loads((out / "mixed_step.json").read_text())
    assert r["commit"] == "abc1234" and r["card"] == "cpu" and r["date"]
    # the agreement run really put prompts into decode steps, and the pass run never did
    assert r["engine_mixed"]["prefills_in_decode_steps"] >= 1 and r["engine_pass"]["prefills_in_decode_steps"] == 0
    assert r["engine_pass"]["prefill_passes"] > r["engine_mixed"]["prefill_passes"]
    same, total = map(int, r["agreement_mixed_vs_pass"]["requests_identical"].split("/"))
    assert total == 6 and 0 <= same <= total
    assert set(r["steps"]["graph_vs_eager_max_abs"]) == {"1", "2", "4"}


def test_host_step_smoke(tmp_path):
    out = tmp_path / "hs.json"
    text = _run([str(ROOT / "benchmarks" / "host_step.py"), "--streams", "8", "--new-tokens", "16", "--seconds", "0.5",
                 "--reps", "2", "--commit", "abc1234", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["commit"] == "abc1234" and r["streams"] == 8 and len(r["reps"]) == 2
    for rep in r["reps"]:
        # a decode step makes at most one token per stream; each request's first token comes from its prefill
        # (1 of every 16), so at most 8 x 16/15 tokens per step
        assert rep["steps"] > 0 and rep["steps"] <= rep["tokens"] <= 8 * rep["steps"] * 16 / 15 + 64
        assert abs(rep["us_per_step"] - rep["seconds"] / rep["steps"] * 1e6) <= 0.01 * rep["us_per_step"] + 1
    assert text.count("steps/s") == 2


def test_gemv_probe_smoke(tmp_path):
    """The probe's kernel (Triton's interpreter) agrees with ``F.linear`` on every row count and config."""
    out = tmp_path / "gp"
    _run([str(ROOT / "benchmarks" / "gemv_probe.py"), "--smoke", "--rows", "1,3,8", "--commit", "abc1234",
          "--out", str(out)])
    r = json.loads((out / "gemv_probe.json").read_text())
    assert r["commit"] == "abc1234" and len(r["cells"]) == 6
    for c in r["cells"]:
        assert c["configs_checked"] == 2 and c["max_rel_err"] is not None and c["max_rel_err"] < 1e-5


def test_host_step_simulated_device(tmp_path):
    """``--device-ms``: every step waits on a simulated in-order device, so it bounds the steps a second, and
    the reported busy share is the device time queued over the wall time."""
    out = tmp_path / "hs.json"
    text = _run([str(ROOT / "benchmarks" / "host_step.py"), "--streams", "8", "--new-tokens", "16", "--seconds", "0.6",
                 "--reps", "1", "--device-ms", "5", "--prefill-ms", "2", "--switch-interval-ms", "0.5",
                 "--commit", "abc1234", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["device_ms"] == 5 and r["switch_interval_s"] == 0.0005
    rep = r["reps"][0]
    assert 0.3 < rep["device_busy"] <= 1.0
    # the device's decode steps alone fill at most the wall time: 5 ms each
    assert rep["steps"] * 0.005 <= rep["seconds"] * 1.0 + 0.01
    assert "device busy" in text


def test_step_trace_busy_and_gaps():
    """The device's busy time is the union of its activities; gaps are bucketed and named by their neighbours."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from step_trace import busy_and_gaps

    iv = [(0.0, 10.0, "a"), (2.0, 12.0, "b"), (15.0, 20.0, "c"), (18.0, 19.0, "d"), (150.0, 160.0, "e"),
          (170.0, 171.0, "f")]
    r = busy_and_gaps(iv, top=2)
    assert r["span_ms"] == 0.171 and r["busy_ms"] == round((12 + 5 + 10 + 1) / 1e3, 3)
    assert r["device_busy"] == round(28 / 171, 4)
    counts = {g["from_us"]: (g["count"], g["total_ms"]) for g in r["gaps"]}
    assert counts == {0: (1, 0.003), 5: (1, 0.01), 20: (0, 0.0), 100: (1, 0.13)}
    assert r["top_gaps"][0] == {"us": 130.0, "after": "c", "before": "e"}
    assert r["top_gaps"][1]["after"] == "e" and len(r["top_gaps"]) == 2
    assert busy_and_gaps([], 3)["device_busy"] is None


def test_step_trace_segments_split_the_timeline_at_long_gaps():
    """The timeline: busy stretches (overlaps merged) split where the device idles longer than the bound."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from step_trace import segments

    iv = [(100.0, 110.0, "a"), (105.0, 130.0, "b"), (140.0, 150.0, "c"), (300.0, 1300.0, "p"), (1301.0, 1302.0, "q")]
    assert segments(iv, 20.0) == [[0.0, 0.05, 3], [0.2, 1.002, 2]]
    assert segments(iv, 5.0) == [[0.0, 0.03, 2], [0.04, 0.01, 1], [0.2, 1.002, 2]]
    assert segments(iv, 5.0, limit=2) == [[0.0, 0.03, 2], [0.04, 0.01, 1]]
    assert segments([], 5.0) == []


def test_step_trace_smoke(tmp_path):
    """On CPU the trace reports the engine's steps over the traced window (no device activities)."""
    out = tmp_path / "st"
    _run([str(ROOT / "benchmarks" / "step_trace.py"), "--preset", "tiny", "--device", "cpu", "--streams", "4",
          "--new-tokens", "8", "--warm-s", "0.5", "--trace-s", "0.4", "--commit", "abc1234", "--out", str(out)])
    r = json.loads((out / "step_trace.json").read_text())
    assert r["commit"] == "abc1234" and r["card"] == "cpu" and r["errors"] == []
    # at most one token per stream and step; the counters are read at the window's edges, where a step's tokens can be
    # counted a step after the step itself (the engine reads step k's tokens once k+1 is queued): one step's worth more
    assert r["steps"] > 0 and 0 < r["decode_tokens_per_step"] <= 4 * (r["steps"] + 1) / r["steps"] + 0.01
    assert abs(r["wall_ms_per_step"] - r["wall_ms"] / r["steps"]) < 0.01
    assert r["device"]["device_busy"] is None


def test_kernel_profile_lists_the_host_ops_with_the_most_self_time():
    """decode_profile.kernel_profile (also prefill_burst's): besides the device's kernels, the host ops with the most
    self time per step, so a host-bound pass says what holds it (on CPU: the ops themselves)."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from decode_profile import kernel_profile

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    p = kernel_profile(lambda: [torch.mm(a, b) for _ in range(3)] and torch.relu(a), steps=4)
    ops = {h["op"]: h for h in p["host_top"]}
    assert ops["aten::mm"]["per_step"] == 3.0 and ops["aten::relu"]["per_step"] == 1.0, ops
    assert all(h["self_us_per_step"] >= 0 for h in p["host_top"])
    assert [h["self_us_per_step"] for h in p["host_top"]] == sorted((h["self_us_per_step"] for h in p["host_top"]),
                                                                    reverse=True)
