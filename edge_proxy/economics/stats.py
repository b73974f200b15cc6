"""Window statistics: the five metrics of every model, computed once per scrape into plain
dataclasses (vLLM ``v1/metrics`` style: stats here, export in :mod:`.collector`).

Owns how each exported number is derived from the window (:mod:`.window`), the configuration,
the results files and the backend's ``/info``: means over the window, the sources of each input,
C_fixed. The arithmetic itself is :mod:`.formulas`. Must not import prometheus_client, do I/O or
keep state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit, urlunsplit

from edge_proxy.config import ConfigError, EconomicsSettings
from edge_proxy.economics import formulas as eco
from edge_proxy.economics.quality_results import ResultsFiles
from edge_proxy.economics.window import ModelWindow, RequestSample

NAN = math.nan
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def weights_backend_label(backend_url: str, shared_path: str | None, hostname: str) -> str:
    """The ``backend`` label of ``edge_proxy_model_weight_bytes``: the backend URL, except that
    proxies sharing one energy table (``energy.shared_path``: several processes on one host) name a
    backend on this machine by the host (``http://127.0.0.1:8000`` -> ``http://HOSTNAME:8000``), so the
    recording rules, which count a non-local backend's weights once, count them once per host and
    not once per proxy process."""
    if not shared_path:
        return backend_url
    parts = urlsplit(backend_url)
    if parts.hostname not in _LOOPBACK:
        return backend_url
    netloc = f"{hostname}:{parts.port}" if parts.port else hostname
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class ModelStats:
    """Every gauge of one model (NaN: inputs missing). ``*_source``: where the input comes from."""

    model: str
    served: int
    joules_per_request: float
    fixed_cost_usd: float
    break_even_requests: float
    break_even_source: str                 # of C_train: measured | estimated | configured
    break_even_progress: float
    score_source: str                      # feedback | probe | feedback+probe | measured | configured | none
    static_score: float | None
    intelligence_per_joule: float
    intelligence_per_joule_source: str
    intelligence_per_watt: float
    system_density: float
    weight_gigabytes: float
    weights_source: str                    # measured | configured | nominal | none
    cold_start_tax: float
    cold_start_time_ratio: float
    quantization_fidelity: float
    quantization_fidelity_source: str


@dataclass(frozen=True)
class EconomicsStats:
    """One scrape's worth of economics: every model's stats and the context they share."""

    mode: str
    backend: str
    energy_source: str                     # the proxy's energy source (none: no component)
    energy_scope: str
    prices: tuple[tuple[str, float], ...]
    models: tuple[ModelStats, ...]


@dataclass(frozen=True)
class Inputs:
    """What the stats read besides the window: config, results files, the backend's /info."""

    cfg: EconomicsSettings
    results: ResultsFiles
    backend_info: Mapping[str, Any]
    energy_source: str | None


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def _guard(fn: Callable[[], float]) -> float:
    try:
        return float(fn())
    except (ValueError, ZeroDivisionError, OverflowError, TypeError):     # never fail a scrape
        return NAN


def prices(cfg: EconomicsSettings) -> tuple[tuple[str, float], ...]:
    return (("per_kwh", cfg.usd_per_kwh), ("gpu_per_hour", cfg.gpu_usd_per_hour),
            ("api_per_million_input_tokens", cfg.api_usd_per_million_input_tokens),
            ("api_per_million_output_tokens", cfg.api_usd_per_million_output_tokens),
            ("api_per_request_paper", cfg.api_cost_per_request_usd))


def paper_gigabytes(model: str, spec: str) -> float:
    """Nominal size [GB] for ``economics.paper_model_sizes[model]`` (e.g. ``1B:INT4``)."""
    label, _, prec = spec.partition(":")
    try:
        return eco.PAPER.model_gigabytes(label, prec or "FP16")
    except KeyError:
        raise ConfigError(
            f"economics.paper_model_sizes[{model!r}] = {spec!r}: expected e.g. 1B:INT4 "
            "(sizes 1B 3B 7B; FP16 INT8 INT4)") from None


def static_score(inp: Inputs, model: str) -> float | None:
    if model in inp.cfg.scores:
        return inp.cfg.scores[model]
    evaluated = inp.results.score(model)
    return evaluated[0] if evaluated is not None else None


def score(inp: Inputs, w: ModelWindow) -> tuple[float, str]:
    """Quality score 0..1 and where it came from: mean of feedback/probe scores in the window
    (``feedback``: user-submitted; ``probe``: golden prompts checked by the proxy;
    ``feedback+probe``), else the configured (or results-file) score, else NaN (``none``)."""
    if w.scores:
        return _mean([x.score for x in w.scores]), "+".join(sorted({x.source for x in w.scores}))
    if w.model not in inp.cfg.scores:
        evaluated = inp.results.score(w.model)
        if evaluated is not None:
            return evaluated
    s = static_score(inp, w.model)
    return (s, "configured") if s is not None else (NAN, "none")


def weight_gigabytes(inp: Inputs, model: str) -> tuple[float, str]:
    cfg = inp.cfg
    if model in cfg.model_gigabytes:
        return cfg.model_gigabytes[model], "configured"
    if cfg.mode == "paper":
        spec = cfg.paper_model_sizes.get(model)
        return (paper_gigabytes(model, spec), "nominal") if spec else (NAN, "none")
    wb = inp.backend_info.get("weight_bytes")
    if isinstance(wb, (int, float)) and wb > 0:
        return wb / 1e9, "measured"
    return NAN, "none"


def fixed_cost_usd(inp: Inputs, cold_start_cost_usd: float) -> float:
    """C_fixed [USD]: adaptation energy (measured C_train from the adaptation results file, else
    configured) at the energy price; production adds adaptation/setup USD and the cold starts."""
    cfg = inp.cfg
    adapt_j = cfg.adaptation_joules + cfg.adaptation_kwh * eco.JOULES_PER_KWH
    if inp.results.adaptation is not None:
        adapt_j = inp.results.adaptation.joules
    if cfg.mode == "paper":
        return eco.energy_cost_usd(adapt_j, cfg.usd_per_kwh)
    return (eco.energy_cost_usd(adapt_j, cfg.usd_per_kwh, cfg.pue)
            + cfg.adaptation_usd + cfg.setup_usd + cold_start_cost_usd)


def quantization_fidelity(inp: Inputs, model: str) -> tuple[float, str]:
    s = static_score(inp, model)
    ref = inp.cfg.reference_scores.get(model)
    if ref is None:
        from_files = inp.results.fidelity(model)
        if from_files is not None:
            return from_files
    if s is None or ref is None:
        return NAN, "none"
    return eco.quantization_fidelity(s, ref), "configured"


def window_span_seconds(w: ModelWindow, window_seconds: float) -> float:
    """Seconds the window's requests cover: from the first one's start to now (at most the
    window, at least 1 ns)."""
    if not w.requests:
        return NAN
    first = w.requests[0].t_ns - int(w.requests[0].duration_seconds * 1e9)
    return min(window_seconds, max((w.now_ns - first) / 1e9, 1e-9))


def _joules(reqs: tuple[RequestSample, ...]) -> list[float]:
    return [x.joules for x in reqs if x.joules is not None]


def compute(inp: Inputs, w: ModelWindow) -> ModelStats:
    """One model's stats from its window (every formula once)."""
    cfg, reqs = inp.cfg, w.requests
    joules = _joules(reqs)
    e_req = _mean(joules) if joules else NAN
    c_fixed = _guard(lambda: fixed_cost_usd(inp, w.cold_start_cost_usd))
    n_break = NAN if not reqs else _guard(lambda: eco.break_even_requests(
        c_fixed, _mean([x.api_cost_usd for x in reqs]), _mean([x.local_cost_usd for x in reqs])))
    progress = NAN if math.isnan(n_break) or n_break == 0 else w.served / n_break
    s, s_src = score(inp, w)
    ipj = NAN if math.isnan(e_req) or math.isnan(s) else _guard(
        lambda: eco.intelligence_per_joule(s, e_req))
    ipj_src = inp.energy_source if s_src == "measured" and inp.energy_source in (
        "estimated", "replay") else s_src
    span = window_span_seconds(w, cfg.window_seconds)
    watts = math.fsum(joules) / span if joules else NAN
    ipw = s / watts if joules and not math.isnan(s) and watts > 0 else NAN
    gb, gb_src = weight_gigabytes(inp, w.model)
    tps = sum(x.output_tokens for x in reqs) / span if reqs else NAN
    density = NAN if math.isnan(gb) or math.isnan(tps) else _guard(lambda: eco.system_density(tps, gb))
    cold_j = [c.joules for c in w.cold_starts if c.joules is not None]
    tax = _guard(lambda: eco.cold_start_tax_from_totals(math.fsum(cold_j), len(cold_j),
                                                        math.fsum(joules), len(joules)))
    tax_t = _guard(lambda: eco.cold_start_time_ratio_from_totals(
        math.fsum(c.seconds for c in w.cold_starts), len(w.cold_starts),
        math.fsum(x.duration_seconds for x in reqs), len(reqs)))
    q, q_src = quantization_fidelity(inp, w.model)
    a = inp.results.adaptation
    return ModelStats(
        model=w.model, served=w.served, joules_per_request=e_req, fixed_cost_usd=c_fixed,
        break_even_requests=n_break, break_even_source=a.source if a is not None else "configured",
        break_even_progress=progress, score_source=s_src, static_score=static_score(inp, w.model),
        intelligence_per_joule=ipj, intelligence_per_joule_source=ipj_src,
        intelligence_per_watt=ipw, system_density=density, weight_gigabytes=gb,
        weights_source=gb_src, cold_start_tax=tax, cold_start_time_ratio=tax_t,
        quantization_fidelity=q, quantization_fidelity_source=q_src)
