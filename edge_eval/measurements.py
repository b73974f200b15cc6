"""The five EDGE-EVAL metrics from a table of measurements (one row per variant).

Reads the measurements CSV of ``edge-eval metrics`` (columns: docs/metrics.md, "Measurements
table"), validates it (the row and column of any bad value named) and computes N_break, IPW,
rho_sys, C_tax and Q_ret with the pure formulas of :mod:`edge_proxy.economics.formulas` (one definition per
quantity; nothing is re-derived here) in the paper's or the production mode, plus the paper's
flags. ``edge-eval report`` uses the same functions on a bench results directory.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from edge_eval.errors import UsageError
from edge_proxy.economics.formulas import (
    PAPER,
    api_cost_usd,
    break_even_requests,
    cold_start_tax,
    energy_cost_usd,
    hardware_time_cost_usd,
    intelligence_per_joule,
    quantization_fidelity,
    system_density,
)

REQUIRED = ("variant", "precision", "batch_requests", "batch_seconds", "batch_energy_joules",
            "output_tokens", "load_seconds", "score")
NUMERIC = ("adaptation_usd", "adaptation_joules", "batch_requests", "batch_seconds",
           "batch_energy_joules", "output_tokens", "input_tokens", "load_seconds",
           "load_energy_joules", "score", "reference_score", "score_scale", "model_bytes")
OUTPUT = ("e_req_joules", "tokens_per_second", "model_gigabytes", "load_energy_joules_used",
          "n_break", "ipw", "rho_sys", "c_tax", "q_ret",
          "roi_within_hour", "serverless_prohibitive", "lossless")
MODES = ("paper", "production")


@dataclass(frozen=True)
class Prices:
    """Production-mode prices (paper mode ignores them and uses :data:`PAPER`)."""

    usd_per_kwh: float = PAPER.usd_per_kwh
    pue: float = 1.0
    api_usd_per_million_input_tokens: float = PAPER.api_usd_per_million_tokens
    api_usd_per_million_output_tokens: float = 10.0
    gpu_usd_per_hour: float = 0.0


def fmt(value: float | bool | str | None) -> str:
    """One fixed text form per value, so the same numbers always give the same bytes."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.6g}"


def read_csv(path: Path, mode: str) -> tuple[list[str], list[dict[str, str]]]:
    """Read and validate a measurements CSV: (header, rows). UsageError names file, row, column."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [dict(r) for r in reader]
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not a CSV file ({exc})") from None
    validate(rows, header, mode, str(path))
    return header, rows


def validate(rows: Sequence[Mapping[str, str | None]], header: Sequence[str], mode: str,
             where: str) -> None:
    """Raise UsageError for a missing column or a value that is not a number (row = file line)."""
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r} (paper or production)")
    need = list(REQUIRED) + (["size_label"] if mode == "paper" else ["load_energy_joules"])
    for col in need:
        if col not in header:
            raise UsageError(f"{where}: missing column {col!r}")
    if "adaptation_usd" not in header and "adaptation_joules" not in header:
        raise UsageError(f"{where}: missing column 'adaptation_usd' (or 'adaptation_joules')")
    if not rows:
        raise UsageError(f"{where}: no rows")
    for i, row in enumerate(rows, start=2):
        if None in row:
            raise UsageError(f"{where}: row {i}: more values than columns")
        for col in header:
            if col not in NUMERIC:
                continue
            text = (row.get(col) or "").strip()
            optional = col not in need
            if not text and optional:
                continue
            try:
                value = float(text)
            except ValueError:
                raise UsageError(f"{where}: row {i} (variant {row.get('variant')!r}), column "
                                 f"{col!r}: {text!r} is not a number") from None
            if value < 0 or math.isnan(value):
                raise UsageError(f"{where}: row {i} (variant {row.get('variant')!r}), column "
                                 f"{col!r}: {text!r} must be >= 0")
        for col in ("batch_requests", "batch_seconds"):
            if float(row[col] or 0) <= 0:
                raise UsageError(f"{where}: row {i} (variant {row.get('variant')!r}), column "
                                 f"{col!r}: must be > 0")
        if mode == "paper":
            try:
                PAPER.model_gigabytes(row.get("size_label") or "", row.get("precision") or "")
            except KeyError:
                raise UsageError(
                    f"{where}: row {i} (variant {row.get('variant')!r}), columns 'size_label'/"
                    f"'precision': no nominal size for {row.get('size_label')!r} "
                    f"{row.get('precision')!r} (1B/3B/7B x FP16/INT8/INT4)") from None


def _num(row: Mapping[str, str | None], col: str) -> float | None:
    text = (row.get(col) or "").strip()
    return float(text) if text else None


def compute_row(row: Mapping[str, str | None], mode: str,
                prices: Prices = Prices()) -> dict[str, float | bool | None]:
    """The five metrics and flags of one validated row.

    Both modes: E_req [J] = batch_energy_joules / batch_requests; throughput [tokens/s] =
    output_tokens / batch_seconds; IPW = (score / score_scale) / E_req; Q_ret = score /
    reference_score x 100 (empty without a reference); C_tax = E_cold / E_req.
    paper: C_fixed = cost(adaptation_joules at 0.12 USD/kWh) + adaptation_usd, C_api = 0.00125,
    C_local = cost(E_req), size = nominal GB of (size_label, precision), E_cold =
    load_energy_joules or, when empty, load_seconds x average batch power (the paper's way).
    production: C_fixed = adaptation + one cold start's energy cost, C_api = the mean request's
    input/output tokens at the API prices, C_local = cost(E_req, PUE) + GPU USD/hour x
    batch_seconds / batch_requests, size = model_bytes / 1e9 (nominal when empty).
    """
    n = float(row["batch_requests"] or 0)
    t_batch = float(row["batch_seconds"] or 0)
    e_batch = float(row["batch_energy_joules"] or 0)
    e_req = e_batch / n
    tps = float(row["output_tokens"] or 0) / t_batch
    load_j = _num(row, "load_energy_joules")
    if load_j is None:
        load_j = float(row["load_seconds"] or 0) * (e_batch / t_batch)
    scale = _num(row, "score_scale") or 1.0
    score = float(row["score"] or 0)
    adapt_usd = _num(row, "adaptation_usd") or 0.0
    adapt_j = _num(row, "adaptation_joules") or 0.0
    if mode == "paper":
        price, pue = PAPER.usd_per_kwh, PAPER.pue
        c_fixed = energy_cost_usd(adapt_j, price, pue) + adapt_usd
        c_api = PAPER.api_cost_per_request_usd
        c_local = energy_cost_usd(e_req, price, pue)
        gb = PAPER.model_gigabytes(row.get("size_label") or "", row.get("precision") or "")
    else:
        price, pue = prices.usd_per_kwh, prices.pue
        c_fixed = energy_cost_usd(adapt_j + load_j, price, pue) + adapt_usd
        n_in = (_num(row, "input_tokens") or 0.0) / n
        n_out = float(row["output_tokens"] or 0) / n      # mean tokens of one request
        c_api = api_cost_usd(n_in, n_out, prices.api_usd_per_million_input_tokens,  # type: ignore[arg-type]
                             prices.api_usd_per_million_output_tokens)
        c_local = energy_cost_usd(e_req, price, pue) + hardware_time_cost_usd(
            t_batch / n, prices.gpu_usd_per_hour)
        weight_bytes = _num(row, "model_bytes")
        if weight_bytes:
            gb = weight_bytes / 1e9
        else:
            try:
                gb = PAPER.model_gigabytes(row.get("size_label") or "", row.get("precision") or "")
            except KeyError:
                gb = math.nan
    ref = _num(row, "reference_score")
    q_ret = quantization_fidelity(score, ref) if ref is not None else None
    n_break = break_even_requests(c_fixed, c_api, c_local)
    c_tax = cold_start_tax(load_j, e_req)
    return {
        "e_req_joules": e_req, "tokens_per_second": tps, "model_gigabytes": gb,
        "load_energy_joules_used": load_j,
        "n_break": n_break,
        "ipw": intelligence_per_joule(score / scale, e_req),
        "rho_sys": system_density(tps, gb) if not math.isnan(gb) else math.nan,
        "c_tax": c_tax, "q_ret": q_ret,
        "roi_within_hour": n_break < PAPER.roi_threshold_requests,
        "serverless_prohibitive": c_tax > PAPER.serverless_threshold,
        "lossless": (q_ret >= PAPER.fidelity_threshold_percent) if q_ret is not None else None,
    }


def compute_table(header: Sequence[str], rows: Iterable[Mapping[str, str | None]], mode: str,
                  prices: Prices = Prices()) -> tuple[list[str], list[dict[str, str]]]:
    """Input columns (passed through) + :data:`OUTPUT` columns, as text."""
    out_header = [c for c in header if c not in OUTPUT] + list(OUTPUT)
    out: list[dict[str, str]] = []
    for row in rows:
        metrics = compute_row(row, mode, prices)
        line = {c: (row.get(c) or "") for c in header if c not in OUTPUT}
        line.update({k: fmt(v) for k, v in metrics.items()})
        out.append(line)
    return out_header, out


def write_csv(path: Path | None, header: Sequence[str], rows: Sequence[Mapping[str, str]]) -> str:
    """Write (or, with no path, return) the table as CSV text with '\\n' line ends."""
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(header), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    text = buf.getvalue()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return text
