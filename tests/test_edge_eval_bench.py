"""``edge-eval bench``: grid validation (file positions, exit 2, nothing started) and the offline
quick preset run for real (tiny synthesized model spawned by edge-proxy, batch, sweep, eval), then
``edge-eval report`` on its results; a failing variant is recorded and the grid goes on."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest


def _bench(*args: str, timeout: float = 500) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_eval", "bench", *args, "--quiet"],
                          capture_output=True, text=True, timeout=timeout)


GOOD = """models:
  - {synth: tiny}
quantizations: [none]
tasks: [rag]
"""


@pytest.mark.parametrize("text, expect", [
    (GOOD + "lod: {batch_requests: 4}\n", ":5:1: unknown key 'lod' in the grid"),
    (GOOD.replace("{synth: tiny}", "{synth: tiny, sise_label: 1B}"),
     ":2:19: unknown key 'sise_label' in a model"),
    (GOOD.replace("[none]", "[none, nf4]") + "device: cpu\n",
     ":3:23: impossible variant: quantization nf4 (bitsandbytes) needs a CUDA device"),
    (GOOD + "adaptation: [qlora]\ndevice: cpu\n", ":5:14: impossible variant: qlora"),
    (GOOD.replace("[rag]", "[rag, poetry]"), ":4:14: task 'poetry' is not one of"),
    (GOOD + "load: {batch_requests: lots}\n", ":5:24: load.batch_requests must be an integer"),
    (GOOD + "eval: {concurrency: 0}\n", ":5:21: eval.concurrency must be >= 1"),
])
def test_bad_grid_one_line_with_position(tmp_path: Path, text: str, expect: str) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(text)
    proc = _bench(str(grid), "--out", str(tmp_path / "out"), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"{grid}{expect}" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()                     # nothing started


@pytest.mark.slow
def test_offline_quick_then_report(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = _bench("--preset", "offline", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    (rec,) = [json.loads(line) for line in (out / "variants.jsonl").read_text().splitlines()]
    assert rec["status"] == "ok", rec["error"]
    m = rec["measurements"]
    # Cold start measured by the proxy (spawned backend), energy from its ledger.
    assert m["load_seconds"] > 0 and m["load_energy_joules"] > 0
    assert m["energy_source"] == "estimated" and m["model_bytes"] > 0
    assert m["batch_requests"] == 8 and m["output_tokens"] > 0 and m["batch_energy_joules"] > 0
    assert m["passes"] == 2 and m["score_ci95_low"] is not None      # 2 passes -> a 95% CI
    assert [s["concurrency"] for s in rec["sweep"]] == [1, 4]
    raw = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    batch = [r for r in raw if r["phase"] == "batch"]
    assert len(batch) == 2 * 8 and all(r["status"] == 200 and r["joules"] > 0 for r in batch)
    assert sum(r["joules"] for r in batch) / 2 == pytest.approx(m["batch_energy_joules"])
    assert not any("content" in r or "text" in r for r in raw)       # no prompt/completion text
    results = json.loads((out / "eval" / rec["variant"] / "results.json").read_text())
    assert results["status"] == "complete" and results["passes"] == 2
    assert results["concurrency"] == 2                              # eval: {concurrency: 2}

    rep = subprocess.run([sys.executable, "-m", "edge_eval", "report", str(out), "--out",
                          str(tmp_path / "report")], capture_output=True, text=True, timeout=180)
    assert rep.returncode == 0, rep.stderr
    with open(tmp_path / "report" / "c_tax.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["c_tax"]) == pytest.approx(
        m["load_energy_joules"] / (m["batch_energy_joules"] / 8), rel=1e-5)
    with open(tmp_path / "report" / "energy_per_token.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2

    # --resume: nothing left to run; without it the directory is refused.
    again = _bench("--preset", "offline", "--quick", "--out", str(out))
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = _bench("--preset", "offline", "--quick", "--out", str(out), "--resume")
    assert resumed.returncode == 0 and "1/1 variants done" in resumed.stderr
    assert len((out / "variants.jsonl").read_text().splitlines()) == 1


def test_failed_variant_recorded_grid_goes_on(tmp_path: Path) -> None:
    """A model path that is not a model fails at its cold start; the next variant still runs
    (here it fails too, for its own reason) and both errors are recorded."""
    bogus = tmp_path / "not-a-model"
    bogus.mkdir()
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"models:\n  - {{path: {bogus}, name: bogus}}\n  - {{path: {bogus}, name: b2}}\n"
                    "tasks: [{name: rag, limit: 2}]\nload: {batch_requests: 2}\ndevice: cpu\n"
                    "energy_source: estimated\n")
    proc = _bench(str(grid), "--out", str(tmp_path / "out"), timeout=300)
    assert proc.returncode == 1
    recs = [json.loads(line) for line in (tmp_path / "out" / "variants.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in recs] == ["bogus-none-rag-none", "b2-none-rag-none"]
    assert all(r["status"] == "failed" and r["error"] for r in recs)
    assert "0/2 variants done" in proc.stderr


def test_presets_expand_to_the_papers_grid() -> None:
    """The paper preset is the paper's 72 variants: 6 models x 3 tasks x (FP16, INT8, INT4 after
    LoRA + one merged 4-bit variant after QLoRA); Q_ret references are the LoRA FP16 variants."""
    from edge_eval.bench_cmd import PRESETS
    from edge_eval.bench_grid import parse

    paper = parse(PRESETS["paper"], "preset:paper")
    assert len(paper.variants) == 72 and paper.batch_requests == 100
    by_prec: dict[str, int] = {}
    for v in paper.variants:
        by_prec[v.precision] = by_prec.get(v.precision, 0) + 1
    assert by_prec == {"FP16": 18, "INT8": 18, "INT4": 36}
    refs = {v.name: v.reference for v in paper.variants}
    assert refs["qwen-3b-lora-chat-int8"] == "qwen-3b-lora-chat-fp16"
    assert refs["qwen-3b-qlora-chat-merged"] is None and refs["qwen-3b-lora-chat-fp16"] is None
    assert len(parse(PRESETS["offline-quick"], "q").variants) == 1
    proc = subprocess.run([sys.executable, "-m", "edge_eval", "bench", "--preset", "paper",
                           "--out", "unused", "--print-grid"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "Qwen/Qwen2.5-7B-Instruct" in proc.stdout


def test_a_grid_that_is_not_yaml_is_one_line_with_its_position(tmp_path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text("models:\n  - id: [unclosed\n")
    proc = subprocess.run([sys.executable, "-m", "edge_eval", "bench", str(grid), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "not valid YAML" in err and "line 3, column 1" in err, err
