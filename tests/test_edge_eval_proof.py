"""The CPU proof (issue: measured intelligence): adapt the tiny synthetic model with LoRA on
builtin:rag (default steps), and check that

* the adapted model's held-out score through ``edge-eval eval`` is clearly above the base's;
* the adapted model served at full precision and as the saved NF4 checkpoint, both evaluated
  through edge-proxy, give the proxy (which reads the results files live, started before they
  existed) IPW, Q_ret and N_break from these files: Q_ret = the paired ratio of the two runs
  (source measured), IPW from the measured score and estimated joules (source estimated), N_break
  with C_train = adaptation.json's joules (source estimated: CPU).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import start_model_server
from tests.edge_eval_support import edge_proxy, run_eval

HELD_OUT = ("--task", "rag", "--data", "builtin:rag:test", "--limit", "30", "--max-tokens", "6")


def _score(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_adapt_then_evaluate_and_the_proxy_reads_the_files(tiny_model_dir, model_server, tmp_path: Path) -> None:
    adapt_dir = tmp_path / "adapt"
    r = subprocess.run([sys.executable, "-m", "edge_eval", "adapt", tiny_model_dir, "--method", "lora",
                        "--task", "rag", "--data", "builtin:rag", "--out", str(adapt_dir), "--merge",
                        "--quantize", "nf4", "--threads", "1", "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    adaptation = json.loads((adapt_dir / "adaptation.json").read_text())
    assert adaptation["energy_source"] == "estimated" and adaptation["device"] == "cpu"
    assert set(adaptation["phases"]) == {"train", "merge", "quantize"}
    assert adaptation["total_joules"] > adaptation["joules"] > 0 and adaptation["tokens"] > 0
    assert adaptation["last_loss"] < adaptation["first_loss"]

    runs = tmp_path / "runs"
    # base: the session's server of the untrained tiny model
    with edge_proxy(model_server.url, "tiny-base") as base_proxy:
        r = run_eval(base_proxy, runs / "base", *HELD_OUT)
        assert r.returncode == 0, r.stderr
    base = _score(runs / "base")["summary"]

    with start_model_server(str(adapt_dir / "merged")) as fp_server, \
            start_model_server(str(adapt_dir / "merged-nf4")) as q_server, \
            edge_proxy(fp_server.url, "tiny-rag") as fp_proxy, \
            edge_proxy(q_server.url, "tiny-rag-nf4", env={
                "EDGE_PROXY_ECONOMICS_QUALITY_RESULTS_PATH": str(runs),
                "EDGE_PROXY_ECONOMICS_ADAPTATION_RESULTS_PATH": str(adapt_dir / "adaptation.json"),
                "EDGE_PROXY_ECONOMICS_API_USD_PER_MILLION_INPUT_TOKENS": "1000",
            }) as q_proxy:
        r = run_eval(fp_proxy, runs / "fp", *HELD_OUT)
        assert r.returncode == 0, r.stderr
        r = run_eval(q_proxy, runs / "nf4", *HELD_OUT, "--reference-model", "tiny-rag")
        assert r.returncode == 0, r.stderr
        fp, q = _score(runs / "fp"), _score(runs / "nf4")
        print(f"held-out token F1: base {base['mean_score']:.3f}, LoRA {fp['summary']['mean_score']:.3f}, "
              f"LoRA NF4 {q['summary']['mean_score']:.3f}; train {adaptation['joules']:.0f} J (estimated)")
        m = q_proxy.metrics()
    pairs = {(i["id"], i["pass"]): i["scores"]["f1"] for i in fp["items"]}
    qs = {(i["id"], i["pass"]): i["scores"]["f1"] for i in q["items"]}
    common = sorted(set(pairs) & set(qs))
    expect_q_ret = 100 * sum(qs[k] for k in common) / sum(pairs[k] for k in common)
    key = lambda name, **lab: (name, tuple(sorted(lab.items())))  # noqa: E731
    assert m[key("edge_proxy_quantization_fidelity_percent", model="tiny-rag-nf4",
                 source="measured")] == pytest.approx(expect_q_ret)
    ipw = m[key("edge_proxy_intelligence_per_joule", model="tiny-rag-nf4", source="estimated")]
    jpr = m[key("edge_proxy_joules_per_request", model="tiny-rag-nf4")]
    assert ipw == pytest.approx(q["summary"]["mean_score"] / jpr)
    fixed = m[key("edge_proxy_fixed_cost_usd", model="tiny-rag-nf4")]
    assert fixed == pytest.approx(adaptation["total_joules"] / 3.6e6 * 0.12)
    n_break = m[key("edge_proxy_break_even_requests", model="tiny-rag-nf4", source="estimated")]
    assert math.isfinite(n_break) and n_break > 0
    # clearly above the base, and above the 1/4 a model gets that only learned the answer
    # vocabulary (builtin rag answers are one of 4 code words): it copies from the context
    assert fp["summary"]["mean_score"] >= max(base["mean_score"] + 0.3, 0.4), (base, fp["summary"])

