"""The five EDGE-EVAL deployment metrics as pure functions (paper and production modes).

Every function here is pure: numbers in, number out, no I/O, no state. The live side
(``edge_proxy.economics.live``) feeds them with measured counters; the tests feed them with the
paper's raw measurements (``tests/data/paper_variants.csv``) and compare with its published tables.

Units: joules (J), seconds (s), US dollars (USD), gigabytes (GB = 1e9 bytes), tokens.
Definitions and derivations: ``docs/metrics.md`` ("The five metrics"); the paper's own definitions
are EDGE-EVAL (ACL 2026 Industry Track) as implemented in its code (Abdullah4152/EDGE-EVAL,
``src/metrics/*.py``, ``compute_all_metrics.py``).

Two modes share the same formulas; only the inputs differ:

- **paper**: ``C_fixed`` = fine-tuning energy cost only, ``C_api`` = 0.00125 USD/request,
  ``C_local`` = energy cost of the batch-amortised request energy at 0.12 USD/kWh, model size from
  the nominal table :data:`PAPER` ``.nominal_model_gigabytes``.
- **production**: ``C_fixed`` = adaptation + setup (+ cold starts), ``C_api`` = the request's real
  input/output tokens at an API price sheet (:func:`api_cost_usd`), ``C_local`` = full-attribution
  energy x PUE x USD/kWh + GPU USD/hour x the request's share of busy time
  (:func:`hardware_time_cost_usd`), model size from measured weight bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

JOULES_PER_KWH = 3.6e6
"""1 kWh = 3.6e6 J."""


def energy_cost_usd(joules: float, usd_per_kwh: float, pue: float = 1.0) -> float:
    """Electricity cost of an amount of energy.

    ``cost [USD] = joules [J] / 3.6e6 [J/kWh] * pue * usd_per_kwh [USD/kWh]``

    ``pue`` (power usage effectiveness, >= 1 in a data centre) scales IT energy to facility energy;
    the paper uses 1.0 (GPU energy only).
    """
    if joules < 0 or usd_per_kwh < 0 or pue <= 0:
        raise ValueError("joules and usd_per_kwh must be >= 0 and pue > 0")
    return joules / JOULES_PER_KWH * pue * usd_per_kwh


def break_even_requests(
    fixed_cost_usd: float, api_cost_per_request_usd: float, local_cost_per_request_usd: float
) -> float:
    """Economic break-even N_break [requests]: how many requests repay the fixed cost.

    ``N_break = C_fixed / (C_api - C_local)``; ``math.inf`` when the API is not dearer per request
    (``C_api <= C_local``): self-hosting never catches up. ``0`` when there is no fixed cost and the
    API is dearer.

    Paper mode: ``C_fixed`` = fine-tuning energy cost (``energy_cost_usd(E_train, 0.12)``),
    ``C_api`` = 0.00125, ``C_local`` = ``energy_cost_usd(E_req, 0.12)``.
    """
    if fixed_cost_usd < 0:
        raise ValueError("fixed_cost_usd must be >= 0")
    margin = api_cost_per_request_usd - local_cost_per_request_usd
    if margin <= 0:
        return math.inf
    return fixed_cost_usd / margin


def intelligence_per_joule(score: float, joules_per_request: float) -> float:
    """Intelligence per joule, the paper's "IPW" [1/J].

    ``IPW = S_norm / E_req`` with ``S_norm`` the task score normalised to 0..1 (the paper divides
    a 1-10 judge score by 10 before calling this) and ``E_req`` the energy of one request in J.
    The paper calls it "per watt"; its unit is per joule. ``math.nan`` when ``E_req`` is 0.
    """
    if joules_per_request < 0:
        raise ValueError("joules_per_request must be >= 0")
    if joules_per_request == 0:
        return math.nan
    return score / joules_per_request


def system_density(tokens_per_second: float, model_gigabytes: float) -> float:
    """System density rho_sys [tokens/s/GB]: throughput per GB of model weights.

    ``rho_sys = tokens_per_second / model_gigabytes``. Paper mode: aggregate batch throughput over
    the nominal size (:attr:`PaperPreset.nominal_model_gigabytes`); production: output tokens/s over
    measured weight bytes / 1e9. ``math.nan`` for a zero size.
    """
    if model_gigabytes < 0 or tokens_per_second < 0:
        raise ValueError("tokens_per_second and model_gigabytes must be >= 0")
    if model_gigabytes == 0:
        return math.nan
    return tokens_per_second / model_gigabytes


def cold_start_tax(cold_start_joules: float, joules_per_request: float) -> float:
    """Cold-start tax C_tax [dimensionless, "requests' worth of energy"] of one mean cold start.

    ``C_tax = E_cold [J] / E_req [J]`` with ``E_req`` a *mean* request energy, as in EDGE-EVAL,
    ACL 2026 Industry Track, §3.4 (``E_req`` = batch energy / N, the batch-amortised mean).
    Paper mode: ``E_cold = t_load * P_avg(inference)``, so power cancels:
    ``C_tax = N t_load / t_batch``. Production: use :func:`cold_start_tax_from_totals`, the one
    definition over a window. ``math.nan`` when ``E_req`` is 0.
    """
    if cold_start_joules < 0 or joules_per_request < 0:
        raise ValueError("energies must be >= 0")
    if joules_per_request == 0:
        return math.nan
    return cold_start_joules / joules_per_request


def cold_start_tax_from_totals(
    cold_start_joules_total: float, cold_starts: int, request_joules_total: float, requests: int
) -> float:
    """C_tax over a window, the one production definition [dimensionless].

    ``C_tax = (sum E_cold [J] / n_cold) / (sum E_req [J] / n_req)``: the mean energy of the cold
    starts in the window over the mean energy of the requests served in it. The means are those
    of EDGE-EVAL, ACL 2026 Industry Track, §3.4 (``E_req`` = batch energy / N requests), and the
    same sums and counts a Prometheus recording rule gets from counters with ``increase()``, so the
    per-instance gauge and the fleet rule (``edge_eval:cold_start_tax:ratio``) agree. A single
    cold start over a set of warm requests is ``cold_starts = 1``. ``math.nan`` when either count
    is 0 or the request energy is 0.
    """
    if cold_starts < 0 or requests < 0:
        raise ValueError("counts must be >= 0")
    if cold_starts == 0 or requests == 0:
        return math.nan
    return cold_start_tax(cold_start_joules_total / cold_starts, request_joules_total / requests)


def cold_start_time_ratio_from_totals(
    cold_start_seconds_total: float, cold_starts: int, request_seconds_total: float, requests: int
) -> float:
    """C_tax's time form over a window [dimensionless]: ``(sum t_cold [s] / n_cold) /
    (sum t_req [s] / n_req)``, means as in :func:`cold_start_tax_from_totals`. ``math.nan`` when
    either count is 0 or the request seconds are 0."""
    if cold_starts < 0 or requests < 0:
        raise ValueError("counts must be >= 0")
    if cold_starts == 0 or requests == 0:
        return math.nan
    return cold_start_time_ratio(cold_start_seconds_total / cold_starts,
                                 request_seconds_total / requests)


def quantization_fidelity(score_quantized: float, score_reference: float) -> float:
    """Quantization fidelity Q_ret [percent].

    ``Q_ret = score_quantized / score_reference * 100``; the reference is the FP16 (or BF16) variant
    evaluated on the same task. Above 100 is possible (noisy sampled evaluations). ``math.nan``
    when the reference score is 0.
    """
    if score_reference == 0:
        return math.nan
    return score_quantized / score_reference * 100.0


# ---------------------------------------------------------------------------------------------
# Production helpers (pure as well)


def api_cost_usd(
    input_tokens: int,
    output_tokens: int,
    usd_per_million_input_tokens: float,
    usd_per_million_output_tokens: float,
) -> float:
    """What the API would charge for one request [USD].

    ``C_api = n_in * p_in / 1e6 + n_out * p_out / 1e6`` (prices in USD per 1M tokens).
    """
    if input_tokens < 0 or output_tokens < 0:
        raise ValueError("token counts must be >= 0")
    return (
        input_tokens * usd_per_million_input_tokens + output_tokens * usd_per_million_output_tokens
    ) / 1e6


def hardware_time_cost_usd(busy_share_seconds: float, gpu_usd_per_hour: float) -> float:
    """Hardware-time cost of one request [USD].

    ``C_hw = busy_share_seconds / 3600 * gpu_usd_per_hour`` where ``busy_share_seconds`` is the
    request's share of the backend's busy time (its duration divided by the number of requests in
    flight with it).
    """
    if busy_share_seconds < 0 or gpu_usd_per_hour < 0:
        raise ValueError("busy_share_seconds and gpu_usd_per_hour must be >= 0")
    return busy_share_seconds / 3600.0 * gpu_usd_per_hour


def keep_warm_break_even_seconds(cold_start_joules: float, idle_watts: float) -> float:
    """Idle time [s] whose idle energy equals one cold start: ``t = E_cold / P_idle``.

    Shorter expected gaps between requests than this: keeping the model warm costs less energy
    than scaling to zero. ``math.inf`` when idle power is 0.
    """
    if cold_start_joules < 0 or idle_watts < 0:
        raise ValueError("cold_start_joules and idle_watts must be >= 0")
    if idle_watts == 0:
        return math.inf
    return cold_start_joules / idle_watts


def cold_start_time_ratio(cold_start_seconds: float, seconds_per_request: float) -> float:
    """Cold-start time ratio [dimensionless]: ``t_cold / t_req`` (the paper's C_tax with power
    cancelled; production reports it next to the energy ratio). ``math.nan`` for ``t_req`` 0."""
    if seconds_per_request <= 0:
        return math.nan
    return cold_start_seconds / seconds_per_request


# ---------------------------------------------------------------------------------------------
# The paper's constants


def _freeze(d: Mapping[tuple[str, str], float]) -> Mapping[tuple[str, str], float]:
    return MappingProxyType(dict(d))


_NOMINAL_GB = {
    ("1B", "FP16"): 2.0, ("1B", "INT8"): 1.0, ("1B", "INT4"): 0.625,
    ("3B", "FP16"): 6.0, ("3B", "INT8"): 3.0, ("3B", "INT4"): 1.875,
    ("7B", "FP16"): 14.0, ("7B", "INT8"): 7.0, ("7B", "INT4"): 4.375,
}


@dataclass(frozen=True)
class PaperPreset:
    """The constants of the paper's metric code (Abdullah4152/EDGE-EVAL, ``src/metrics/*.py``)."""

    usd_per_kwh: float = 0.12                       # "US average"
    api_cost_per_request_usd: float = 0.00125       # 500 tokens at GPT-4o's 2.50 USD / 1M
    api_tokens_per_request: int = 500
    api_usd_per_million_tokens: float = 2.50
    pue: float = 1.0
    roi_threshold_requests: float = 20.0            # ROI_Within_Hour if N_break < 20
    serverless_threshold: float = 100.0             # Serverless_Prohibitive if C_tax > 100
    fidelity_threshold_percent: float = 99.9        # Passes_99.9% if Q_ret >= 99.9
    requests_per_hour: float = 60.0                 # Hours_to_Breakeven = N_break / 60
    chat_score_scale: float = 10.0                  # judge helpfulness 1-10 -> 0..1
    # Nominal model size in GB by (size label, precision); QLoRA-merged counts as INT4.
    nominal_model_gigabytes: Mapping[tuple[str, str], float] = field(
        default_factory=lambda: _freeze(_NOMINAL_GB)
    )

    def model_gigabytes(self, size_label: str, precision: str) -> float:
        """Nominal size [GB] for a size label ("1B", "3B", "7B") and precision ("FP16", "INT8",
        "INT4", "QLoRA-merged" = INT4)."""
        prec = precision.upper()
        if prec in ("QLORA-MERGED", "MERGED", "NF4"):
            prec = "INT4"
        if prec == "BF16":
            prec = "FP16"
        key = (size_label.upper(), prec)
        if key not in self.nominal_model_gigabytes:
            raise KeyError(f"no nominal size for {size_label} {precision}")
        return self.nominal_model_gigabytes[key]


PAPER = PaperPreset()
"""The paper's preset: ``PAPER.usd_per_kwh == 0.12``, ``PAPER.api_cost_per_request_usd ==
0.00125``, ``PAPER.model_gigabytes("1B", "INT4") == 0.625``."""
