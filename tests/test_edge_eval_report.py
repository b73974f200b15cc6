"""``edge-eval report``: the paper's CSVs, markdown, plots and an offline HTML page, the same bytes
for the same input, and an honest report of a half-written results directory."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from tests.test_edge_eval_metrics import _measurements

OUTPUTS = ["n_break.csv", "ipw.csv", "rho_sys.csv", "c_tax.csv", "q_ret.csv", "summary.csv",
           "energy_per_token.csv", "report.md", "report.html", "n_break.png", "ipw_vs_size.png",
           "rho_sys_by_precision.png", "c_tax.png", "q_ret.png", "energy_per_token.png"]


def _report(results: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_eval", "report", str(results), "--out",
                           str(out), *extra], capture_output=True, text=True, timeout=180)


def test_paper_table_report_is_byte_identical(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    _measurements(results / "measurements.csv")
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        proc = _report(results, out, "--mode", "paper")
        assert proc.returncode == 0, proc.stderr
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    with open(a / "n_break.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 72 and list(rows[0])[-1] == "roi_within_hour"
    with open(a / "q_ret.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 36      # LoRA INT8/INT4 against LoRA FP16
    for png in [n for n in OUTPUTS if n.endswith(".png")]:
        data = (a / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"matplotlib" not in data, png
    page = (a / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 6
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "| Llama-1B-LoRA-rag-INT4 |" in (a / "report.md").read_text()


def test_half_written_results_say_what_is_missing(tmp_path: Path) -> None:
    results = tmp_path / "r"
    results.mkdir()
    (results / "grid.json").write_text(json.dumps(
        {"variants": [{"name": n} for n in ("ok-a", "bad-b", "todo-c")]}))
    meas = {"precision": "FP16", "adaptation_joules": 0, "batch_requests": 4,
            "batch_seconds": 2.0, "batch_energy_joules": 8.0, "output_tokens": 40,
            "load_seconds": 1.5, "load_energy_joules": 3.0, "score": 0.5,
            "model_bytes": 1000000}
    lines = [json.dumps({"variant": "ok-a", "status": "ok", "measurements": meas,
                         "sweep": [{"concurrency": 1, "joules_per_output_token": 0.3},
                                   {"concurrency": 4, "joules_per_output_token": 0.2}]}),
             json.dumps({"variant": "bad-b", "status": "failed", "error": "backend exited 1"}),
             '{"variant": "todo-c", "sta']                    # a write cut short
    (results / "variants.jsonl").write_text("\n".join(lines))
    proc = _report(results, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "1 variant(s) reported" in proc.stderr
    assert "missing (planned, no result yet): todo-c" in proc.stderr
    assert "failed: bad-b: backend exited 1" in proc.stderr
    assert "line 3: not valid JSON" in proc.stderr
    md = (tmp_path / "out" / "report.md").read_text()
    assert "todo-c" in md and "bad-b" in md
    with open(tmp_path / "out" / "c_tax.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["c_tax"]) == 3.0 / 2.0          # E_cold 3 J over E_req 8/4 J
    with open(tmp_path / "out" / "energy_per_token.csv", newline="") as f:
        assert [r["concurrency"] for r in csv.DictReader(f)] == ["1", "4"]


def test_empty_and_missing_dirs(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _report(empty, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "nothing measured yet" in proc.stderr
    assert (tmp_path / "out" / "report.html").exists()
    proc = _report(tmp_path / "nope", tmp_path / "out2")
    assert proc.returncode == 2 and "not a directory" in proc.stderr
    assert "Traceback" not in proc.stderr
    (tmp_path / "a-file").write_text("x")                  # --out names a file: one line, not a traceback
    proc = _report(empty, tmp_path / "a-file")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("edge-eval report: error: cannot use "), proc.stderr
