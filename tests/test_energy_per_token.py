"""benchmarks/energy_per_token.py on CPU (tiny model, estimated source): every cell has tokens, the
ledger's J/token and the counter's, conservation holds over each window, and bad options fail in one
line. The GPU run (bf16/NF4/INT4 at 1/8/64/256, NVML) uses the same code path."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "energy_per_token.py"


@pytest.mark.slow
def test_cpu_cells_ledger_next_to_counter(tiny_model_dir: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model-dir", str(tiny_model_dir), "--device", "cpu",
                           "--energy-source", "estimated", "--quantizations", "none", "--concurrency", "1,2",
                           "--seconds", "1", "--reps", "1", "--max-tokens", "8", "--settle", "0.3",
                           "--warm-seconds", "0.3", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "energy_per_token.json").read_text())
    assert doc["errors"] == {} and [c["concurrency"] for c in doc["cells"]] == [1, 2]
    for c in doc["cells"]:
        d = c["deltas_joules"]
        assert c["errors"] == 0 and c["streams"] >= 1 and c["output_tokens"] >= 8 * c["streams"]
        assert c["ledger_full_j_per_token"] == pytest.approx(d["full"] / d["output_tokens"])
        assert 0 < d["active"] <= d["full"] <= d["measured"] * (1 + 1e-9)   # at-rest idle is not charged
        assert abs(c["conservation_error"]) < 1e-6
    md = (tmp_path / "energy_per_token.md").read_text()
    assert md.count("\n| none |") == 2 and "conservation error" in md


@pytest.mark.slow
def test_two_proxies_sharing_the_counter_conserve_it_together(tiny_model_dir: Path, tmp_path: Path) -> None:
    """--proxies 2: two proxy processes on one port share the counter; summed over both, every
    window's ledger adds up to the counter, and their counters to the one read directly."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model-dir", str(tiny_model_dir), "--device", "cpu",
                           "--energy-source", "estimated", "--quantizations", "none", "--concurrency", "4",
                           "--seconds", "1.5", "--reps", "1", "--max-tokens", "8", "--settle", "0.3",
                           "--warm-seconds", "0.3",
                           "--proxies", "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "energy_per_token.json").read_text())
    assert doc["proxies"] == 2 and doc["errors"] == {}
    (c,) = doc["cells"]
    d = c["deltas_joules"]
    assert c["errors"] == 0 and c["streams"] >= 2 and 0 < d["active"] <= d["full"] <= d["measured"] * (1 + 1e-9)
    assert abs(c["conservation_error"]) < 1e-6
    # the model server's CPU estimate read here vs the two proxies' counters together: one count,
    # not two (without the share each proxy would count all of it: -50 %)
    assert abs(c["direct_vs_proxy_counter"]) < 0.05, c
    assert "2 proxies sharing the counter" in (tmp_path / "energy_per_token.md").read_text()


@pytest.mark.slow
def test_the_model_server_with_api_workers(tiny_model_dir: Path, tmp_path: Path) -> None:
    """--api-workers 2: the model server serves HTTP from two worker processes in front of its engine (the fast
    engine); the cells still count tokens and conserve the counter, and the report says how the server ran."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model-dir", str(tiny_model_dir), "--device", "cpu",
                           "--engine", "fast", "--energy-source", "estimated", "--quantizations", "none",
                           "--concurrency", "2", "--seconds", "1", "--reps", "1", "--max-tokens", "8",
                           "--settle", "0.3", "--warm-seconds", "0.3", "--api-workers", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "energy_per_token.json").read_text())
    assert doc["api_workers"] == 2 and doc["errors"] == {} and "--api-workers 2" in doc["command"]
    (c,) = doc["cells"]
    assert c["errors"] == 0 and c["streams"] >= 2 and c["output_tokens"] >= 8 * c["streams"]
    assert c["server_api_workers"] == 2 and abs(c["conservation_error"]) < 1e-6
    assert "2 API worker processes" in (tmp_path / "energy_per_token.md").read_text()


def test_bad_concurrency_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny", "--concurrency", "1,x",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "--concurrency takes positive integers, --reps >= 1, --seconds > 0, --proxies 1..16, --api-workers 0..16")


def test_a_server_that_cannot_start_is_reported_with_its_own_reason(tmp_path: Path) -> None:
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model-dir", str(empty), "--device", "cpu",
                           "--energy-source", "estimated", "--quantizations", "none", "--concurrency", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    why = json.loads((tmp_path / "energy_per_token.json").read_text())["errors"]["none"]
    assert "before it was ready" in why and "(model server: model-server serve: error:" in why
    assert "has no config.json" in why and why in (tmp_path / "energy_per_token.md").read_text()
