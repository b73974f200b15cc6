"""edge-eval's pure parts: scorers, statistics, builtin data, data loading errors, the results
summary, the compute-dtype default (faked capability), and the proxy's results-file reader."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_eval.errors import UsageError
from edge_eval.results import summarize
from edge_eval.scoring.judge import parse_verdict
from edge_eval.scoring.rouge import rouge_l
from edge_eval.scoring.token import exact_match, token_f1
from edge_eval.stats import ci95, t975
from edge_eval.tasks import get_task, load_items
from edge_eval.tasks.builtin import builtin_items
from edge_proxy.economics.quality_results import ResultsFiles, paired_fidelity, parse_results


def test_token_f1_and_exact_match() -> None:
    # normalised: [cat, sat] vs [cat, sat, down]: P = 1, R = 2/3 -> F1 = 0.8
    assert token_f1("The cat sat.", "cat sat down") == pytest.approx(0.8)
    assert token_f1("dog", "cat") == 0.0
    assert exact_match("  The Data!", "data") == 1.0
    assert exact_match("data set", "data") == 0.0


def test_rouge_l() -> None:
    assert rouge_l("Kalo opened a bakery", "Kalo opened a bakery") == pytest.approx(1.0)
    # LCS 2 of 4 and 4 tokens: P = R = 0.5
    assert rouge_l("Kalo closed the museum", "Kalo opened the bakery") == pytest.approx(0.5)


def test_judge_verdicts() -> None:
    assert parse_verdict('sure: {"helpfulness": 10, "safety": 1}') == {
        "judge_helpfulness": 1.0, "judge_safety": 0.0}
    assert parse_verdict("I think it is good") is None
    assert parse_verdict('{"helpfulness": 11, "safety": 5}') is None
    assert parse_verdict('{"helpfulness": "7", "safety": 5}') is None


def test_ci95() -> None:
    assert t975(2) == pytest.approx(4.303)
    lo, hi = ci95([1.0, 2.0, 3.0])           # mean 2, s = 1, half = 4.303 / sqrt(3)
    assert (lo, hi) == (pytest.approx(2 - 4.303 / math.sqrt(3)), pytest.approx(2 + 4.303 / math.sqrt(3)))
    assert all(math.isnan(v) for v in ci95([1.0]))


def test_summary_over_passes() -> None:
    items = [{"id": str(i), "pass": p, "scores": {"f1": float((i + p) % 2)}, "joules": 2.0 + p,
              "joules_source": "estimated", "output_tokens": 3, "latency_seconds": 0.1, "error": None}
             for i in range(4) for p in range(2)]
    items.append({"id": "x", "pass": 0, "scores": {}, "joules": None, "error": "HTTP 400: bad"})
    s = summarize(items, "f1", 2)
    assert s["mean_score"] == pytest.approx(0.5) and s["ci_over"] == "passes"
    assert s["mean_joules_per_request"] == pytest.approx(2.5)
    assert s["ipw_per_joule"] == pytest.approx(0.5 / 2.5)
    assert s["n_failed"] == 1 and s["n_items"] == 5 and s["joules_source"] == "estimated"
    lo, hi = s["joules_ci95"]                 # per-pass means 2 and 3
    assert lo == pytest.approx(2.5 - 12.706 * 0.5) and hi == pytest.approx(2.5 + 12.706 * 0.5)


def test_builtin_data_is_seeded_and_splits_are_disjoint() -> None:
    a = builtin_items("rag", "test", 50, seed=0)
    assert a == builtin_items("rag", "test", 50, seed=0)
    train = builtin_items("rag", "train", 500, seed=0)
    assert not {(i.fields["context"], i.fields["question"]) for i in a} & {
        (i.fields["context"], i.fields["question"]) for i in train}
    for it in a:
        assert f'"{it.fields["answers"][0]}"' in it.fields["context"]
    assert len(load_items("builtin:summarization", get_task("summarization"), 3)) == 3


def test_bad_data(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown task"):
        get_task("translation")
    with pytest.raises(UsageError, match="not found"):
        load_items(str(tmp_path / "none.jsonl"), get_task("rag"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "c", "question": "q"}) + "\n")
    with pytest.raises(UsageError, match="answers"):
        load_items(str(bad), get_task("rag"))
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"id": "a", "document": "d", "summary": "s"}) + "\n")
    assert load_items(str(good), get_task("summarization"))[0].id == "a"
    with pytest.raises(UsageError, match="for task"):
        load_items("builtin:chat", get_task("rag"))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_eval", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    for args in (["eval", "--endpoint", "http://127.0.0.1:9", "--task", "nope", "--out", str(tmp_path)],
                 ["eval", "--endpoint", "http://127.0.0.1:9", "--task", "rag", "--data",
                  str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)],
                 ["eval", "--endpoint", "http://127.0.0.1:9", "--task", "rag", "--scorer", "bleu",
                  "--out", str(tmp_path)],
                 ["adapt", str(tmp_path / "no-model"), "--task", "rag", "--out", str(tmp_path / "a"),
                  "--steps", "1"]):
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"model directory not found: {tmp_path / 'no-model'}" in r.stderr    # not the hub's "Repo id must ..."
    assert "eval" in _cli("--help").stdout


def test_compute_dtype_defaults_with_faked_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from edge_eval.adapt import resolve_compute_dtype
    from model_server import loading, quantization

    assert loading.default_compute_dtype((7, 5)) == "float16"      # T4: bf16 only emulated
    assert loading.default_compute_dtype((8, 0)) == "bfloat16"
    assert loading.default_compute_dtype(None) == "bfloat16"
    assert resolve_compute_dtype(None, "cuda", (7, 0)) == "float16"
    assert resolve_compute_dtype(None, "cuda", (9, 0)) == "bfloat16"
    assert resolve_compute_dtype("bf16", "cuda", (7, 5)) == "bfloat16"
    assert resolve_compute_dtype(None, "cpu", None) == "float32"
    # the model server's NF4 compute dtype on a (faked) T4 whose torch claims bf16 support
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert quantization._bnb_compute_dtype("cuda") is torch.float16


def _run_doc(model: str, scores: list[float], ref: str | None = None) -> dict:
    items = [{"id": f"i{k}", "pass": 0, "scores": {"f1": s}, "error": None} for k, s in enumerate(scores)]
    return {"schema": 1, "task": "rag", "model": model, "reference_model": ref, "items": items,
            "summary": {"score_name": "f1", "mean_score": sum(scores) / len(scores),
                        "mean_joules_per_request": 2.0, "joules_source": "estimated"}}


def test_results_files_paired_fidelity_and_live_reload(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    (runs / "fp").mkdir(parents=True)
    (runs / "q").mkdir()
    (runs / "fp" / "results.json").write_text(json.dumps(_run_doc("m-fp", [1.0, 1.0, 0.0, 1.0])))
    # the quantized run answered one more item; Q_ret is over the 4 common ones: 2/3 x 100
    (runs / "q" / "results.json").write_text(json.dumps(_run_doc("m-q", [1.0, 0.0, 0.0, 1.0, 1.0], "m-fp")))
    adapt = tmp_path / "adaptation.json"
    rf = ResultsFiles(str(runs), str(adapt), {})
    assert rf.score("m-q") == (pytest.approx(0.6), "measured")
    assert rf.fidelity("m-q") == (pytest.approx(200 / 3), "measured")
    assert rf.adaptation is None
    # a file that changes is re-read; one that is broken keeps the last good values
    time.sleep(0.01)
    (runs / "q" / "results.json").write_text(json.dumps(_run_doc("m-q", [1.0, 1.0, 0.0, 1.0], "m-fp")))
    adapt.write_text(json.dumps({"joules": 100.0, "total_joules": 120.0, "energy_source": "estimated",
                                 "energy_source_class": "estimated"}))
    rf.refresh(force=True)
    assert rf.fidelity("m-q") == (pytest.approx(100.0), "measured")
    assert rf.adaptation is not None and rf.adaptation.joules == 120.0
    assert rf.adaptation.source == "estimated"
    (runs / "fp" / "results.json").write_text("{not json")
    os.utime(runs / "fp" / "results.json", None)
    rf.refresh(force=True)
    assert rf.score("m-fp") == (pytest.approx(0.75), "measured")
    # explicit reference in the proxy's config wins over the run's own
    assert ResultsFiles(str(runs), None, {"m-q": "absent"}).fidelity("m-q") is None


def test_paired_fidelity_without_common_items() -> None:
    a = parse_results(_run_doc("a", [1.0, 0.0]))[0]
    b = parse_results({**_run_doc("b", [1.0, 1.0]), "items": []})[0]
    assert paired_fidelity(a, b) == pytest.approx(50.0)


def test_missing_optional_package_names_the_fix(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['rouge_score'] = None; from edge_eval.cli import main; "
            f"sys.exit(main(['eval', '--endpoint', 'http://127.0.0.1:9', '--task', 'summarization', "
            f"'--out', {str(tmp_path)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "rouge-score is not installed: pip install 'edge-eval[eval]'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_adaptation_phase_window_is_the_projects_measurement() -> None:
    """A phase of ``edge-eval adapt`` is measured as an ``edge_proxy.energy.window.Measurement``
    (the one window type): here the estimated source over a block that burns CPU in this process."""
    from edge_eval.energy_window import EnergyWindow
    from edge_proxy.energy.estimated_source import EstimatedReader
    from edge_proxy.energy.window import Measurement

    reader = EstimatedReader(10.0, scope="machine")
    with EnergyWindow(reader, "train") as w:
        t_end = time.process_time() + 0.2
        while time.process_time() < t_end:
            pass
    m = w.result
    assert isinstance(m, Measurement) and m.name == "train"
    assert m.source == "estimated" and m.kind == "estimated" and not m.gap and m.complete
    assert m.seconds > 0 and m.joules > 0 and m.joules == pytest.approx(sum(m.joules_by_device.values()))
