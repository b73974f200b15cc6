"""benchmarks/energy_load.py runs end to end (a short run on 127.0.0.1; its numbers are in
docs/benchmarks.md, never asserted here): three proxies (energy none, estimated, replay) side by
side behind one fake backend, every summary complete; bad input is one line and exit code 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "energy_load.py"


def test_energy_load_runs_every_source_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    run = subprocess.run([sys.executable, str(BENCH), "--concurrency", "8", "--seconds", "2", "--rounds", "1",
                          "--warmup", "0.5", "--tokens", "4", "--first-token-ms", "20", "--token-interval-ms", "20",
                          "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    data = json.loads(out.read_text())
    sums = {s["source"]: s for s in data["summaries"]}
    assert set(sums) == {"none", "estimated", "replay"}
    for s in sums.values():
        assert s["errors"] == 0 and s["completed"] > 0, s
        assert s["stream_p50_seconds"] >= 0.08                  # 20 ms + 3 x 20 ms per stream
        assert s["scrapes"] >= 1 and s["scrape_failures"] == 0 and s["probes"] > 10
    rows = [line for line in run.stdout.splitlines() if line.startswith("| none") or line.startswith("| estimated")
            or line.startswith("| replay")]
    assert len(rows) == 3


def test_energy_load_two_shared_proxies_split_the_clients(tmp_path: Path) -> None:
    """A -x2 target: two proxy processes sharing one counter, the clients split over them; loop lag,
    GC and CPU summed over both (twice the lag timer's runs of one process over the same window)."""
    out = tmp_path / "load.json"
    run = subprocess.run([sys.executable, str(BENCH), "--concurrency", "8", "--seconds", "2", "--rounds", "1",
                          "--warmup", "0.5", "--tokens", "4", "--first-token-ms", "20", "--token-interval-ms", "20",
                          "--sources", "none,replay-x2", "--json", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    sums = {s["source"]: s for s in json.loads(out.read_text())["summaries"]}
    assert set(sums) == {"none", "replay-x2"}
    one, two = sums["none"], sums["replay-x2"]
    assert two["errors"] == 0 and two["completed"] > 0 and two["probes"] > 20
    assert two["loop_lag_runs"] > 1.5 * one["loop_lag_runs"], (one, two)


def test_energy_load_rejects_bad_input_in_one_line() -> None:
    for bad in ("none,gpu", "none,replay-x9", "none,gpu-x2", "none,replay-x1", "none,replay-xx"):
        run = subprocess.run([sys.executable, str(BENCH), "--sources", bad], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 2 and run.stderr.count("\n") == 1 and "--sources" in run.stderr, (bad, run.stderr)
    run = subprocess.run([sys.executable, str(BENCH), "--trace", "/nonexistent.jsonl"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "trace not found" in run.stderr
