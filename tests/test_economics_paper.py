"""The five metric functions reproduce the EDGE-EVAL paper's published tables from its raw
measurements.

Inputs (tests/data/paper_variants.csv, tests/data/paper_training_energy.csv) are transcribed from
the authors' published results (Abdullah4152/EDGE-EVAL: results/vllm_inference_metrics_tesla_t4_dual.csv,
results/final_36_variants_report_{llama,qwen}.csv, results/training_energy_log_{llama,qwen}.csv): per-variant score, load/inference seconds, throughput, average
power, energy per request, and fine-tuning energy. The same CSV also carries the paper's published
outputs (N_break, IPW, rho_sys, C_tax columns), transcribed, never computed by our code. Every
comparison allows the published rounding plus the error that rounding of the inputs propagates.
"""
from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import pytest

from edge_proxy.economics.formulas import (
    PAPER,
    break_even_requests,
    cold_start_tax,
    energy_cost_usd,
    intelligence_per_joule,
    quantization_fidelity,
    system_density,
)

DATA = Path(__file__).parent / "data"


def _rows() -> list[dict[str, str]]:
    with open(DATA / "paper_variants.csv", newline="") as f:
        return list(csv.DictReader(f))


def _training() -> dict[tuple[str, str, str, str], float]:
    with open(DATA / "paper_training_energy.csv", newline="") as f:
        return {
            (r["family"], r["size"], r["method"], r["task"]): float(r["joules"])
            for r in csv.DictReader(f)
        }


ROWS = _rows()
IDS = [f"{r['family']}-{r['size']}-{r['method']}-{r['task']}-{r['precision']}" for r in ROWS]


def _norm_score(r: dict[str, str]) -> float:
    s = float(r["score"])
    return s / PAPER.chat_score_scale if r["task"] == "chat" else s


def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def _half_unit(text: str) -> float:
    return 0.5 * 10 ** -_decimals(text)


def test_transcribed_data_is_complete() -> None:
    assert len(ROWS) == 72
    assert len(_training()) == 36
    assert {r["precision"] for r in ROWS} == {"FP16", "INT8", "INT4", "QLoRA-merged"}


def test_paper_preset_constants() -> None:
    assert PAPER.usd_per_kwh == 0.12
    assert PAPER.api_cost_per_request_usd == pytest.approx(
        PAPER.api_tokens_per_request / 1e6 * PAPER.api_usd_per_million_tokens
    )
    assert PAPER.model_gigabytes("1B", "QLoRA-merged") == PAPER.model_gigabytes("1B", "INT4")
    with pytest.raises(KeyError):
        PAPER.model_gigabytes("13B", "FP16")


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_n_break(row: dict[str, str]) -> None:
    e_train = _training()[(row["family"], row["size"], row["method"], row["task"])]
    e_req = float(row["energy_per_request_joules"])
    got = break_even_requests(
        energy_cost_usd(e_train, PAPER.usd_per_kwh),
        PAPER.api_cost_per_request_usd,
        energy_cost_usd(e_req, PAPER.usd_per_kwh),
    )
    published = row["n_break"]
    # Training joules are integers (exact to 1 J); C_local is ~1e-7 USD, so only the published
    # rounding matters.
    assert got == pytest.approx(float(published), abs=_half_unit(published) + 1e-3)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_ipw(row: dict[str, str]) -> None:
    score, e_req = _norm_score(row), float(row["energy_per_request_joules"])
    got = intelligence_per_joule(score, e_req)
    score_err = _half_unit(row["score"]) / (10 if row["task"] == "chat" else 1)
    propagated = got * (score_err / score + _half_unit(row["energy_per_request_joules"]) / e_req)
    published = row["ipw_per_joule"]
    assert got == pytest.approx(float(published), abs=_half_unit(published) + propagated)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_rho_sys(row: dict[str, str]) -> None:
    gb = PAPER.model_gigabytes(row["size"], row["precision"])
    got = system_density(float(row["tokens_per_second"]), gb)
    propagated = _half_unit(row["tokens_per_second"]) / gb
    published = row["rho_sys"]
    assert got == pytest.approx(float(published), abs=_half_unit(published) + propagated)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_c_tax(row: dict[str, str]) -> None:
    load, watts = float(row["load_seconds"]), float(row["power_avg_watts"])
    e_req = float(row["energy_per_request_joules"])
    got = cold_start_tax(load * watts, e_req)
    rel = (
        _half_unit(row["load_seconds"]) / load
        + _half_unit(row["power_avg_watts"]) / watts
        + _half_unit(row["energy_per_request_joules"]) / e_req
    )
    published = row["c_tax"]
    assert got == pytest.approx(float(published), abs=_half_unit(published) + got * rel)


def _q_ret_rows() -> dict[str, list[tuple[float, float]]]:
    """(Q_ret, propagated error) per precision, LoRA variants against their LoRA-FP16 baseline."""
    fp16 = {
        (r["family"], r["size"], r["task"]): r
        for r in ROWS
        if r["method"] == "LoRA" and r["precision"] == "FP16"
    }
    out: dict[str, list[tuple[float, float]]] = {"INT8": [], "INT4": []}
    for r in ROWS:
        if r["method"] == "LoRA" and r["precision"] in out:
            ref = fp16[(r["family"], r["size"], r["task"])]
            q, s = float(r["score"]), float(ref["score"])
            value = quantization_fidelity(q, s)
            err = value * (_half_unit(r["score"]) / q + _half_unit(ref["score"]) / s)
            out[r["precision"]].append((value, err))
    return out


# Q_ret summary statistics of the authors' published q_ret.csv (Abdullah4152/EDGE-EVAL, results/).
PUBLISHED_Q_RET = {
    "INT8": {"n": 18, "mean": "100.73", "median": "99.90", "min": "97.91", "max": "109.53",
             "passing": 9},
    "INT4": {"n": 18, "mean": "99.52", "median": "99.79", "min": "91.38", "max": "103.34",
             "passing": 7},
}


@pytest.mark.parametrize("precision", ["INT8", "INT4"])
def test_q_ret_summary(precision: str) -> None:
    rows = _q_ret_rows()[precision]
    pub = PUBLISHED_Q_RET[precision]
    assert len(rows) == pub["n"]
    values = [v for v, _ in rows]
    max_err = max(e for _, e in rows)
    for stat, fn in (("mean", statistics.mean), ("median", statistics.median), ("min", min),
                     ("max", max)):
        text = str(pub[stat])
        assert fn(values) == pytest.approx(float(text), abs=_half_unit(text) + max_err), stat
    passing = sum(v >= PAPER.fidelity_threshold_percent for v in values)
    # A value within rounding error of the threshold may fall either side.
    unsure = sum(abs(v - PAPER.fidelity_threshold_percent) <= e for v, e in rows)
    assert abs(passing - pub["passing"]) <= unsure


def test_headline_aggregates() -> None:
    """§5.1/§5.2/§5.4 aggregates recomputed from our per-row values."""
    train = _training()
    n_break, rho_l1_int4, ipw_1b_int4, ipw_7b_int4 = [], [], [], []
    for r in ROWS:
        e_req = float(r["energy_per_request_joules"])
        n = break_even_requests(
            energy_cost_usd(train[(r["family"], r["size"], r["method"], r["task"])], 0.12),
            PAPER.api_cost_per_request_usd,
            energy_cost_usd(e_req, 0.12),
        )
        n_break.append(n)
        int4 = PAPER.model_gigabytes(r["size"], r["precision"]) == PAPER.model_gigabytes(
            r["size"], "INT4")
        ipw = intelligence_per_joule(_norm_score(r), e_req)
        if int4 and r["size"] == "1B":
            ipw_1b_int4.append(ipw)
            if r["family"] == "Llama":
                rho_l1_int4.append(
                    system_density(float(r["tokens_per_second"]), PAPER.model_gigabytes("1B", "INT4"))
                )
        if int4 and r["size"] == "7B":
            ipw_7b_int4.append(ipw)
    assert statistics.median(n_break) == pytest.approx(13.8, abs=0.05)
    assert sum(n < PAPER.roi_threshold_requests for n in n_break) == 46
    assert statistics.mean(rho_l1_int4) == pytest.approx(6930, abs=1)
    ratio = statistics.mean(ipw_1b_int4) / statistics.mean(ipw_7b_int4)
    assert ratio == pytest.approx(3.27, abs=0.01)


def test_edge_cases() -> None:
    assert break_even_requests(1.0, 0.001, 0.001) == math.inf
    assert break_even_requests(1.0, 0.001, 0.002) == math.inf
    assert break_even_requests(0.0, 0.002, 0.001) == 0.0
    assert math.isnan(intelligence_per_joule(0.5, 0.0))
    assert math.isnan(system_density(100.0, 0.0))
    assert math.isnan(cold_start_tax(100.0, 0.0))
    assert math.isnan(quantization_fidelity(0.5, 0.0))
    assert energy_cost_usd(3.6e6, 0.12, pue=1.5) == pytest.approx(0.18)
    with pytest.raises(ValueError):
        energy_cost_usd(-1.0, 0.12)
