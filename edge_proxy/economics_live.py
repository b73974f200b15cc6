"""Live economics: an observer that turns every finished request into dollars, and the five metrics.

Counters (exported per model, user traffic only; probes are kept out)::

    edge_proxy_energy_cost_usd_total{model}            full-attribution joules x PUE x USD/kWh
    edge_proxy_hardware_cost_usd_total{model}          GPU USD/hour x the request's busy-time share
    edge_proxy_api_equivalent_cost_usd_total{model}    real tokens x the API price sheet
    edge_proxy_economics_requests_total{model}
    edge_proxy_economics_tokens_total{model,type}      type = input | output
    edge_proxy_economics_energy_joules_total{model}    full-attribution joules of those requests
    edge_proxy_quality_score_sum / _count{model,source}  source = feedback | probe
    edge_proxy_economics_cold_starts_total{model}, ..._cold_start_energy_joules_total{model},
    ..._cold_start_seconds_total{model}, edge_proxy_cold_start_cost_usd_total{model}

Gauges (computed at scrape time over ``economics.window_seconds``)::

    edge_proxy_break_even_requests{model,source}                 N_break (source of C_train)
    edge_proxy_break_even_progress_ratio{model}                  requests served / N_break
    edge_proxy_intelligence_per_joule{model,source}              IPW [1/J] (source of the score)
    edge_proxy_intelligence_per_watt{model}                      score / mean watts [1/W]
    edge_proxy_system_density_tokens_per_second_per_gigabyte{model}   rho_sys
    edge_proxy_economics_cold_start_tax_ratio{model}             C_tax (energy)
    edge_proxy_economics_cold_start_time_ratio{model}            C_tax (time)
    edge_proxy_quantization_fidelity_percent{model,source}       Q_ret (measured: edge-eval runs)
    edge_proxy_model_weight_bytes{model,backend,source}          source = measured|configured|nominal
    edge_proxy_economics_sources_info{model,energy_source,energy_kind,energy_scope,score_source,weights_source}
                                                                 where each model's inputs come from
    edge_proxy_fixed_cost_usd{model}, edge_proxy_quality_static_score{model}

Formulas live in :mod:`edge_proxy.economics`; this module only collects inputs.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import statistics
import time
import uuid
from collections import deque
from types import SimpleNamespace
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from aiohttp import ClientSession, ClientTimeout, web
from prometheus_client import CollectorRegistry, Counter, Summary
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from edge_proxy import economics as eco
from edge_proxy.proxy import json_input
from edge_proxy.config import ConfigError, Settings
from edge_proxy.proxy.hooks import BaseObserver, RequestRecord
from edge_proxy.metric_children import Children
from edge_proxy.quality import (
    GoldenPrompt,
    RecentRequests,
    load_golden_prompts,
)
from edge_proxy.quality_results import ResultsFiles, sourced_gauges

log = logging.getLogger("edge_proxy.economics")

PROBE_HEADER = "x-edge-traffic"          # value "probe": the proxy labels the request traffic=probe
_MAX_WINDOW_SAMPLES = 100_000
# label values known up front (their series are created at 0: the first increment shows in rate())
FEEDBACK_OUTCOMES = ("accepted", "bad_request", "disabled", "unauthorized", "unknown_request")
PROBE_OUTCOMES = ("pass", "fail", "error")
INFO_MIN_INTERVAL_SECONDS = 1.0          # /info polls: at most one per second, whatever wakes them


def served_by_backend(rec: RequestRecord) -> bool:
    """Whether economics counts this request as served (docs/metrics.md): a user request (not a
    probe) that ended ``ok``, or ``cancelled`` after the backend produced at least one output token.
    A request cancelled while held, before the backend's response headers, or before any token,
    was never answered: no request, tokens or joules in economics (its energy still shows in the
    energy totals)."""
    if rec.traffic == "probe":
        return False
    if rec.outcome == "ok":
        return True
    return rec.outcome == "cancelled" and (rec.t_first_token_ns is not None
                                           or bool(rec.output_tokens))


@dataclass(frozen=True)
class _Sample:
    t_ns: int
    joules: float | None
    input_tokens: int
    output_tokens: int
    local_cost_usd: float
    api_cost_usd: float
    duration_seconds: float


@dataclass(frozen=True)
class _ColdStart:
    t_ns: int
    joules: float | None
    seconds: float


class _BusyClock:
    """Processor-sharing clock: integral of 1/n(t) dt while n > 0 requests are in flight.

    A request's busy-time share is the clock's advance between its start and its end; the shares
    of all requests sum to the backend's busy time.
    """

    def __init__(self) -> None:
        self.n = 0
        self.acc_seconds = 0.0
        self._t_ns: int | None = None

    def _advance(self, t_ns: int) -> None:
        if self._t_ns is not None and self.n > 0 and t_ns > self._t_ns:
            self.acc_seconds += (t_ns - self._t_ns) / 1e9 / self.n
        if self._t_ns is None or t_ns > self._t_ns:
            self._t_ns = t_ns

    def start(self, t_ns: int) -> float:
        self._advance(t_ns)
        self.n += 1
        return self.acc_seconds

    def end(self, t_ns: int, started_at: float) -> float:
        self._advance(t_ns)
        self.n = max(0, self.n - 1)
        return max(0.0, self.acc_seconds - started_at)


class EconomicsObserver(BaseObserver):
    """Request observer + cold-start sink + feedback endpoint + quality probes."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry,
        clock_ns: Callable[[], int] = time.monotonic_ns,
        gate: Any = None,
        energy: Any = None,
    ) -> None:
        self.settings = settings
        self.gate = gate                          # the cold-start gate (its history), or None
        self.energy_component = energy            # the energy component, or None
        self.cfg = settings.economics
        if self.cfg.mode not in ("production", "paper"):
            raise ConfigError(f"economics.mode must be production or paper, got {self.cfg.mode!r}")
        if self.cfg.window_seconds <= 0:
            raise ConfigError("economics.window_seconds must be > 0")
        self.paper = self.cfg.mode == "paper"
        self.clock_ns = clock_ns
        self.backend = settings.proxy.backend_url
        self.runtime: Any = None                  # edge_proxy.proxy.server.ProxyRuntime (factory sets it)
        self._probe_ids: dict[str, str] = {}      # request ids of probes in flight -> model label
        self._cold_ids: set[object] = set()
        self._info_wake: asyncio.Event | None = None   # set: poll /info now (weights unknown)
        self._info_settled = False     # the last /info poll reached a backend that is up
        self._scrape_cache: dict[str, list[_Sample]] | None = None
        self._busy = _BusyClock()
        self._window: dict[str, deque[_Sample]] = {}
        self._scores: dict[str, deque[tuple[int, float, str]]] = {}    # (t_ns, score, feedback|probe)
        self._cold: dict[str, deque[_ColdStart]] = {}
        self._served: dict[str, int] = {}
        self._cold_cost_usd: dict[str, float] = {}
        self.recent = RecentRequests(self.cfg.feedback_capacity)
        self._touched: set[str] = set()
        self.backend_info: dict[str, Any] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # evaluation / adaptation results from edge-eval, re-read when the files change
        self.results_files = ResultsFiles(self.cfg.quality_results_path,
                                          self.cfg.adaptation_results_path,
                                          self.cfg.reference_models)
        self.golden: list[GoldenPrompt] = []
        if self.cfg.probes_path:
            self.golden = load_golden_prompts(self.cfg.probes_path)
        for model, spec in self.cfg.paper_model_sizes.items():
            self._paper_gigabytes(model, spec)      # validate early

        m = ("model",)
        self.energy_cost = Counter("edge_proxy_energy_cost_usd", "Electricity cost of user "
                                   "requests: full-attribution joules x PUE x USD/kWh.", m,
                                   registry=registry)
        self.hardware_cost = Counter("edge_proxy_hardware_cost_usd", "Hardware-time cost of user "
                                     "requests: GPU USD/hour x each request's busy-time share.", m,
                                     registry=registry)
        self.api_cost = Counter("edge_proxy_api_equivalent_cost_usd", "What the API would have "
                                "charged for the same requests (real tokens x API price sheet; "
                                "paper mode: flat USD per request).", m, registry=registry)
        self.requests = Counter("edge_proxy_economics_requests", "User requests counted by "
                                "economics: outcome ok, or cancelled after the backend produced "
                                "tokens; probes excluded.", m,
                                registry=registry)
        self.tokens = Counter("edge_proxy_economics_tokens", "Tokens of user requests counted by "
                              "economics.", ("model", "type"), registry=registry)
        self.energy = Counter("edge_proxy_economics_energy_joules", "Full-attribution energy of "
                              "user requests counted by economics (before PUE).", m,
                              registry=registry)
        self.quality = Summary("edge_proxy_quality_score", "Quality scores (0..1) from feedback "
                               "and probes.", ("model", "source"), registry=registry)
        self.probes = Counter("edge_proxy_quality_probes", "Quality probes sent, by outcome.",
                              ("model", "outcome"), registry=registry)
        self.feedback = Counter("edge_proxy_feedback", "Feedback posts, by outcome.",
                                ("outcome",), registry=registry)
        self.cold_starts = Counter("edge_proxy_economics_cold_starts", "Cold starts reported to "
                                   "economics.", m, registry=registry)
        self.cold_energy = Counter("edge_proxy_economics_cold_start_energy_joules", "Energy of "
                                   "cold starts reported to economics.", m, registry=registry)
        self.cold_seconds = Counter("edge_proxy_economics_cold_start_seconds", "Duration of cold "
                                    "starts reported to economics.", m, registry=registry)
        self.cold_cost = Counter("edge_proxy_cold_start_cost_usd", "Electricity cost of cold "
                                 "starts (part of the fixed cost in production mode).", m,
                                 registry=registry)
        for outcome in FEEDBACK_OUTCOMES:   # known up front: every series starts at 0
            self.feedback.labels(outcome)
        for model in sorted(set(self.cfg.scores) | set(self.cfg.reference_scores)):
            self._touch(model)          # configured models: their series exist from the start
        registry.register(_EconomicsCollector(self))
        # per-request counters: label children looked up once (see metric_children)
        self._children = SimpleNamespace(**{name: Children(getattr(self, name)) for name in (
            "energy_cost", "hardware_cost", "api_cost", "requests", "tokens", "energy")})

    # ------------------------------------------------------------------ request hooks
    def on_request_start(self, rec: RequestRecord) -> None:
        probe_id = rec.client_request_id
        if probe_id is not None and probe_id in self._probe_ids:
            # Our own quality probe (its x-request-id is a random id we sent): label it so it
            # stays out of every user statistic.
            rec.traffic = "probe"
            self._probe_ids[probe_id] = rec.model
        rec.extra["economics.busy0"] = self._busy.start(self.clock_ns())
        if rec.traffic != "probe" and rec.model != "unknown":
            # (during a cold start the model is not known yet: on_request_end touches it then)
            self._touch(rec.model)

    def _touch(self, model: str) -> None:
        """Create the model's counter series at 0 as soon as the model is seen, so the first
        increments (which land when a request's energy is final) show in rate() and increase()."""
        if model in self._touched:
            return
        self._touched.add(model)
        for c in (self.energy_cost, self.hardware_cost, self.api_cost, self.requests, self.energy,
                  self.cold_starts, self.cold_energy, self.cold_seconds, self.cold_cost):
            c.labels(model)
        self.tokens.labels(model, "input")
        self.tokens.labels(model, "output")
        if self.cfg.feedback_token:
            self.quality.labels(model, "feedback")
        if self.golden:
            self.quality.labels(model, "probe")
            for outcome in PROBE_OUTCOMES:
                self.probes.labels(model, outcome)

    def on_request_end(self, rec: RequestRecord) -> None:
        started = rec.extra.get("economics.busy0")
        if isinstance(started, float):
            t = rec.t_end_ns if rec.t_end_ns is not None else self.clock_ns()
            rec.extra["economics.busy_share_seconds"] = self._busy.end(t, started)
        if served_by_backend(rec):
            self._touch(rec.model)
            # Known for feedback from the moment the answer is out, not only once its energy is
            # final (a tick later): a client may score a request right after reading it.
            self.recent.add(rec.request_id, rec.model, None)

    def sync_cold_starts(self) -> None:
        """Pick up finished cold starts from the cold-start gate's history (if the gate exists)."""
        gate = self.gate
        for cs in list(getattr(gate, "history", ()) or ()):
            try:
                if getattr(cs, "outcome", None) != "ready" or cs.id in self._cold_ids:
                    continue
                joules, _src = cs.tax_joules
                self.record_cold_start(None, joules, float(cs.seconds or 0.0), cold_start_id=cs.id)
            except Exception:               # the gate's record shape changed: skip, never raise
                log.debug("economics: could not read a cold start", exc_info=True)

    def on_request_final(self, rec: RequestRecord) -> None:
        self.sync_cold_starts()
        # Only user requests the backend answered: ok, or cancelled by the client mid-answer
        # (its tokens were produced and paid for). Failed and rejected requests are not
        # business traffic; their energy still shows in the energy component's totals.
        if not served_by_backend(rec):
            return
        model = rec.model
        n_in = rec.input_tokens or 0
        n_out = rec.output_tokens or 0
        joules = None
        if rec.energy is not None and rec.energy.source != "none":
            joules = max(0.0, rec.energy.full_joules)
        pue = 1.0 if self.paper else self.cfg.pue
        e_cost = eco.energy_cost_usd(joules or 0.0, self.cfg.usd_per_kwh, pue)
        share = rec.extra.get("economics.busy_share_seconds", 0.0)
        hw_cost = 0.0 if self.paper else eco.hardware_time_cost_usd(
            float(share) if isinstance(share, (int, float)) else 0.0, self.cfg.gpu_usd_per_hour)
        if self.paper:
            api = self.cfg.api_cost_per_request_usd
        else:
            api = eco.api_cost_usd(n_in, n_out, self.cfg.api_usd_per_million_input_tokens,
                                   self.cfg.api_usd_per_million_output_tokens)
        ch = self._children
        ch.energy_cost(model).inc(e_cost)
        ch.hardware_cost(model).inc(hw_cost)
        ch.api_cost(model).inc(api)
        ch.requests(model).inc()
        ch.tokens(model, "input").inc(n_in)
        ch.tokens(model, "output").inc(n_out)
        ch.energy(model).inc(joules or 0.0)
        self._served[model] = self._served.get(model, 0) + 1
        now = self.clock_ns()
        win = self._window.setdefault(model, deque(maxlen=_MAX_WINDOW_SAMPLES))
        win.append(_Sample(now, joules, n_in, n_out, e_cost + hw_cost, api,
                           rec.duration_seconds or 0.0))
        self._prune(win, now)
        self.recent.add(rec.request_id, model, joules)
        if self._info_wake is not None and not self._info_settled:
            # a request just succeeded: the backend is up again, poll /info now (the poller
            # keeps at least INFO_MIN_INTERVAL_SECONDS between polls whatever the traffic)
            self._info_wake.set()

    # ------------------------------------------------------------------ other inputs
    def record_cold_start(self, model: str | None, joules: float | None, seconds: float,
                          cold_start_id: object = None) -> None:
        """Record one finished cold start. ``model`` None: the backend's model (all models this
        proxy serves). ``joules`` None when no energy source covers it. ``cold_start_id``: the
        gate's id, so a cold start pushed here and also seen in the gate's history counts once.

        The cold-start gate (``self.gate``) may call this; economics also
        picks up finished cold starts from the gate's ``history`` by itself."""
        if cold_start_id is not None:
            if cold_start_id in self._cold_ids:
                return
            self._cold_ids.add(cold_start_id)
        key = model or "*"
        self._cold.setdefault(key, deque(maxlen=100)).append(
            _ColdStart(self.clock_ns(), joules, max(0.0, seconds)))
        label = model or self._default_model()
        self.cold_starts.labels(label).inc()
        self.cold_seconds.labels(label).inc(max(0.0, seconds))
        if joules is not None and joules >= 0:
            self.cold_energy.labels(label).inc(joules)
            cost = eco.energy_cost_usd(joules, self.cfg.usd_per_kwh,
                                       1.0 if self.paper else self.cfg.pue)
            self.cold_cost.labels(label).inc(cost)
            self._cold_cost_usd[key] = self._cold_cost_usd.get(key, 0.0) + cost

    def record_score(self, model: str, score: float, source: str) -> None:
        """A quality score in 0..1 from ``feedback`` or ``probe``."""
        if not 0.0 <= score <= 1.0 or math.isnan(score):
            raise ValueError("score must be within 0..1")
        self.quality.labels(model, source).observe(score)
        self._scores.setdefault(model, deque(maxlen=_MAX_WINDOW_SAMPLES)).append(
            (self.clock_ns(), score, source))

    # ------------------------------------------------------------------ derived values
    def _prune(self, win: deque[Any], now_ns: int) -> None:
        horizon = now_ns - int(self.cfg.window_seconds * 1e9)
        while win and win[0].t_ns < horizon:
            win.popleft()

    def _default_model(self) -> str:
        if self.settings.proxy.model_name:
            return self.settings.proxy.model_name
        if len(self._served) == 1:
            return next(iter(self._served))
        served_by_backend = getattr(getattr(self.runtime, "backend", None), "model", None)
        if served_by_backend:
            return str(served_by_backend)
        mid = self.backend_info.get("model_id")
        return str(mid) if mid else "unknown"

    def models(self) -> list[str]:
        names = set(self._served) | set(self._scores) | set(self.cfg.scores)
        names |= set(self.results_files.runs) | {m for m in self._cold if m != "*"}
        return sorted(names)

    def fixed_cost_usd(self, model: str) -> float:
        adapt_j = self.cfg.adaptation_joules + self.cfg.adaptation_kwh * eco.JOULES_PER_KWH
        if self.results_files.adaptation is not None:    # measured C_train replaces the configured one
            adapt_j = self.results_files.adaptation.joules
        if self.paper:
            return eco.energy_cost_usd(adapt_j, self.cfg.usd_per_kwh)
        cold = self._cold_cost_usd.get(model, 0.0) + self._cold_cost_usd.get("*", 0.0)
        return (eco.energy_cost_usd(adapt_j, self.cfg.usd_per_kwh, self.cfg.pue)
                + self.cfg.adaptation_usd + self.cfg.setup_usd + cold)

    def _samples(self, model: str) -> list[_Sample]:
        cache = self._scrape_cache
        if cache is not None and model in cache:
            return cache[model]
        win = self._window.get(model)
        out: list[_Sample] = []
        if win:
            self._prune(win, self.clock_ns())
            out = list(win)
        if cache is not None:
            cache[model] = out
        return out

    @contextlib.contextmanager
    def scrape_snapshot(self) -> Any:
        """Within the block, each model's window is copied once (one consistent scrape)."""
        self._scrape_cache = {}
        try:
            yield
        finally:
            self._scrape_cache = None

    def break_even_requests(self, model: str) -> float:
        s = self._samples(model)
        if not s:
            return math.nan
        local = _mean([x.local_cost_usd for x in s])
        api = _mean([x.api_cost_usd for x in s])
        return eco.break_even_requests(self.fixed_cost_usd(model), api, local)

    def score(self, model: str) -> tuple[float, str]:
        """Quality score 0..1 and where it came from: mean of feedback/probe scores in the
        window (``feedback``: user-submitted; ``probe``: golden prompts checked by the proxy;
        ``feedback+probe``), else the configured (or results-file) score, else NaN (``none``)."""
        sc = self._scores.get(model)
        if sc:
            horizon = self.clock_ns() - int(self.cfg.window_seconds * 1e9)
            while sc and sc[0][0] < horizon:
                sc.popleft()
            if sc:
                return _mean([x[1] for x in sc]), "+".join(sorted({x[2] for x in sc}))
        if model not in self.cfg.scores:
            evaluated = self.results_files.score(model)
            if evaluated is not None:
                return evaluated
        static = self.static_score(model)
        if static is not None:
            return static, "configured"
        return math.nan, "none"

    def static_score(self, model: str) -> float | None:
        if model in self.cfg.scores:
            return self.cfg.scores[model]
        evaluated = self.results_files.score(model)
        return evaluated[0] if evaluated is not None else None

    def joules_per_request(self, model: str) -> float:
        j = [x.joules for x in self._samples(model) if x.joules is not None]
        return _mean(j) if j else math.nan

    def median_joules_per_request(self, model: str) -> float:
        j = [x.joules for x in self._samples(model) if x.joules is not None]
        return statistics.median(j) if j else math.nan

    def intelligence_per_joule(self, model: str) -> float:
        e = self.joules_per_request(model)
        score, _ = self.score(model)
        if math.isnan(e) or math.isnan(score):
            return math.nan
        return eco.intelligence_per_joule(score, e)

    def _window_span_seconds(self, s: list[_Sample]) -> float:
        if not s:
            return math.nan
        first = s[0].t_ns - int(s[0].duration_seconds * 1e9)
        span = (self.clock_ns() - first) / 1e9
        return min(self.cfg.window_seconds, max(span, 1e-9))

    def intelligence_per_watt(self, model: str) -> float:
        """Score / mean power of the requests' energy over the window [1/W]."""
        s = self._samples(model)
        j = [x.joules for x in s if x.joules is not None]
        score, _ = self.score(model)
        if not j or math.isnan(score):
            return math.nan
        watts = sum(j) / self._window_span_seconds(s)
        return score / watts if watts > 0 else math.nan

    def weight_gigabytes(self, model: str) -> tuple[float, str]:
        if model in self.cfg.model_gigabytes:
            return self.cfg.model_gigabytes[model], "configured"
        if self.paper:
            spec = self.cfg.paper_model_sizes.get(model)
            if spec:
                return self._paper_gigabytes(model, spec), "nominal"
            return math.nan, "none"
        wb = self.backend_info.get("weight_bytes")
        if isinstance(wb, (int, float)) and wb > 0:
            return wb / 1e9, "measured"
        return math.nan, "none"

    @staticmethod
    def _paper_gigabytes(model: str, spec: str) -> float:
        label, _, prec = spec.partition(":")
        try:
            return eco.PAPER.model_gigabytes(label, prec or "FP16")
        except KeyError:
            raise ConfigError(
                f"economics.paper_model_sizes[{model!r}] = {spec!r}: expected e.g. 1B:INT4 "
                "(sizes 1B 3B 7B; FP16 INT8 INT4)") from None

    def tokens_per_second(self, model: str) -> float:
        s = self._samples(model)
        if not s:
            return math.nan
        return sum(x.output_tokens for x in s) / self._window_span_seconds(s)

    def system_density(self, model: str) -> float:
        gb, _ = self.weight_gigabytes(model)
        tps = self.tokens_per_second(model)
        if math.isnan(gb) or math.isnan(tps):
            return math.nan
        return eco.system_density(tps, gb)

    def _cold_list(self, model: str) -> list[_ColdStart]:
        return list(self._cold.get(model, ())) + list(self._cold.get("*", ()))

    def cold_start_tax(self, model: str) -> float:
        cs = [c.joules for c in self._cold_list(model) if c.joules is not None]
        e = self.median_joules_per_request(model)
        if not cs or math.isnan(e):
            return math.nan
        return eco.cold_start_tax(_mean(cs), e)

    def cold_start_time_ratio(self, model: str) -> float:
        cs = self._cold_list(model)
        d = [x.duration_seconds for x in self._samples(model)]
        if not cs or not d:
            return math.nan
        return eco.cold_start_time_ratio(_mean([c.seconds for c in cs]),
                                         statistics.median(d))

    def quantization_fidelity(self, model: str) -> float:
        return self.quantization_fidelity_sourced(model)[0]

    def quantization_fidelity_sourced(self, model: str) -> tuple[float, str]:
        score = self.static_score(model)
        ref = self.cfg.reference_scores.get(model)
        if ref is None:
            from_files = self.results_files.fidelity(model)
            if from_files is not None:
                return from_files
        if score is None or ref is None:
            return math.nan, "none"
        return eco.quantization_fidelity(score, ref), "configured"

    def break_even_progress(self, model: str) -> float:
        """Requests served so far / N_break (>= 1: the fixed cost is repaid)."""
        n = self.break_even_requests(model)
        if math.isnan(n) or n == 0:
            return math.nan
        return self.served(model) / n

    def served(self, model: str) -> int:
        return self._served.get(model, 0)

    # ------------------------------------------------------------------ HTTP: feedback
    async def handle_feedback(self, request: web.Request) -> web.Response:
        token = self.cfg.feedback_token
        if not token:
            self.feedback.labels("disabled").inc()
            return _error(404, "feedback is disabled: set economics.feedback_token")
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not hmac.compare_digest(
                auth[7:].strip().encode(), token.encode()):
            self.feedback.labels("unauthorized").inc()
            return _error(401, "missing or wrong bearer token",
                          headers={"WWW-Authenticate": "Bearer"})
        try:
            body = json_input.loads(await request.read())
            rid = body["request_id"]
            score = body["score"]
            if not isinstance(rid, str) or isinstance(score, bool) \
                    or not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
                raise ValueError      # (NaN and infinities fail the range check)
            score = float(score)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            self.feedback.labels("bad_request").inc()
            return _error(400, 'body must be {"request_id": str, "score": number in 0..1}')
        seen = self.recent.get(rid)
        if seen is None:
            self.feedback.labels("unknown_request").inc()
            return _error(404, "unknown or expired request_id")
        if not self.recent.claim_feedback(rid):
            self.feedback.labels("duplicate").inc()
            return _error(409, "feedback for this request_id was already accepted")
        self.record_score(seen.model, score, "feedback")
        self.feedback.labels("accepted").inc()
        return web.json_response({"accepted": True, "model": seen.model})

    def register_routes(self, app: web.Application) -> None:
        app.router.add_post("/edge/feedback", self.handle_feedback)

    # ------------------------------------------------------------------ background tasks
    async def on_startup(self, app: web.Application) -> None:
        self._info_wake = asyncio.Event()
        self._tasks.append(asyncio.create_task(self._poll_info()))
        if self.golden:
            self._tasks.append(asyncio.create_task(self._run_probes()))

    async def on_cleanup(self, app: web.Application) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()

    async def _poll_info(self) -> None:
        """Poll the backend's ``/info`` for ``weight_bytes``: quickly (1 s, doubling up to
        ``info_poll_seconds``) while it is down or still loading, then every ``info_poll_seconds``.

        A backend that answers but has no ``/info`` of ours (vLLM: 404) or reports no weights
        (TGI) is settled: it is polled at the slow interval, and successful requests do not wake
        the poller (they would otherwise cost one ``/info`` request per proxied request)."""
        url = self.backend.rstrip("/") + "/info"
        retry = 1.0
        async with ClientSession(timeout=ClientTimeout(total=5)) as session:
            while True:
                settled = False
                t_poll = time.monotonic()
                try:
                    async with session.get(url) as resp:
                        if resp.status == 200:
                            data = await resp.json(content_type=None)
                            if isinstance(data, dict):
                                self.backend_info = data
                                # Ours reports state; other backends (TGI) never report weights.
                                settled = data.get("state") in (None, "ready") or bool(
                                    data.get("weight_bytes"))
                            else:
                                settled = True
                        else:     # up, without an /info of ours; 502-504: a gateway says down
                            settled = resp.status not in (502, 503, 504)
                except Exception:           # backend down or not ours: try again later
                    pass
                self._info_settled = settled
                if settled:
                    retry = 1.0
                    delay = self.cfg.info_poll_seconds
                else:
                    delay = min(retry, self.cfg.info_poll_seconds)
                    retry = min(retry * 2, self.cfg.info_poll_seconds)
                wake = self._info_wake
                if wake is None:
                    await asyncio.sleep(delay)
                else:
                    wake.clear()
                    # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the result when
                    # the event is set in the loop turn the task is cancelled (shutdown), losing
                    # the cancellation; the poller then kept the proxy's cleanup waiting
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await wake.wait()
                # never more often than this, however often requests wake the poller
                rest = INFO_MIN_INTERVAL_SECONDS - (time.monotonic() - t_poll)
                if rest > 0:
                    await asyncio.sleep(min(rest, delay))

    def _probe_target(self) -> str:
        rt = self.runtime
        if rt is not None and getattr(rt, "port", None):
            host = rt.settings.proxy.host
            host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
            return f"http://{host}:{rt.port}"
        host = self.settings.proxy.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://{host}:{self.settings.proxy.port}"

    async def run_probe(self, session: ClientSession, g: GoldenPrompt) -> bool | None:
        """Send one golden prompt through the proxy; record a 1/0 score. None on error."""
        backend_model = getattr(getattr(self.runtime, "backend", None), "model", None)
        model = g.model or backend_model or str(self.backend_info.get("model_id") or "default")
        body = {"model": model, "prompt": g.prompt, "max_tokens": g.max_tokens,
                "temperature": 0.0}
        rid = f"probe-{uuid.uuid4().hex}"
        headers = {PROBE_HEADER: "probe", "x-request-id": rid}
        self._probe_ids[rid] = self.settings.proxy.model_name or model
        try:
            async with session.post(self._probe_target() + "/v1/completions", json=body,
                                    headers=headers) as resp:
                data = await resp.json(content_type=None)
                if resp.status != 200:
                    raise RuntimeError(f"status {resp.status}")
            text = data["choices"][0]["text"]
        except Exception:
            self.probes.labels(self._probe_ids.pop(rid, model), "error").inc()
            return None
        label = self._probe_ids.pop(rid, model)    # the label the proxy gave the request
        ok = g.check(text)
        self.probes.labels(label, "pass" if ok else "fail").inc()
        self.record_score(label, 1.0 if ok else 0.0, "probe")
        return ok

    async def _run_probes(self) -> None:
        i = 0
        timeout = ClientTimeout(total=self.cfg.probe_timeout_seconds)
        async with ClientSession(timeout=timeout) as session:
            await asyncio.sleep(min(self.cfg.probe_interval_seconds, 1.0))
            while True:
                await self.run_probe(session, self.golden[i % len(self.golden)])
                i += 1
                await asyncio.sleep(self.cfg.probe_interval_seconds)


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}}, status=status,
                             headers=headers)


class _EconomicsCollector(Collector):
    """Scrape-time gauges derived from the observer's window."""

    def __init__(self, obs: EconomicsObserver) -> None:
        self.obs = obs

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []

    def collect(self) -> Iterable[GaugeMetricFamily]:
        with self.obs.scrape_snapshot():
            return list(self._collect())

    def _sources_info(self, models: list[str]) -> GaugeMetricFamily:
        """One series per model (value 1) saying where the inputs of its economics gauges come
        from; dashboards join on ``model`` (``* on(model) group_left(energy_source, ...)``)."""
        from edge_proxy.energy.exporter import SOURCE_KIND, source_scope

        o = self.obs
        comp = o.energy_component
        esrc = comp.source if comp is not None else "none"
        escope = source_scope(comp.sampler.reader) if comp is not None else "none"
        g = GaugeMetricFamily(
            "edge_proxy_economics_sources_info", "Where each model's economics inputs come from "
            "(value 1): energy_source/energy_kind/energy_scope (joules of N_break, IPW, C_tax, cost, "
            "energy per request), score_source (feedback = user-submitted, probe, configured, none), "
            "weights_source (measured, configured, nominal).",
            labels=["model", "energy_source", "energy_kind", "energy_scope", "score_source", "weights_source"])
        for m in models:
            try:
                score_src = o.score(m)[1]
                weights_src = o.weight_gigabytes(m)[1]
            except Exception:           # never fail a scrape
                score_src = weights_src = "unknown"
            g.add_metric([m, esrc, SOURCE_KIND.get(esrc, "none"), escope, score_src, weights_src], 1.0)
        return g

    def _collect(self) -> Iterable[GaugeMetricFamily]:
        o = self.obs
        o.sync_cold_starts()
        o.results_files.refresh()
        models = o.models()
        yield from sourced_gauges(o, models)
        fams: list[tuple[str, str, Callable[[str], float]]] = [
            ("edge_proxy_break_even_progress_ratio", "Requests served so far / N_break.",
             o.break_even_progress),
            ("edge_proxy_fixed_cost_usd", "Fixed cost: adaptation + setup (+ cold starts in "
             "production mode).", o.fixed_cost_usd),
            ("edge_proxy_intelligence_per_watt", "Quality score / mean power of the requests "
             "over the window [1/W].", o.intelligence_per_watt),
            ("edge_proxy_system_density_tokens_per_second_per_gigabyte", "rho_sys: output "
             "tokens/s over the window / GB of weights.", o.system_density),
            ("edge_proxy_economics_cold_start_tax_ratio", "C_tax: mean cold-start joules / "
             "median request joules.", o.cold_start_tax),
            ("edge_proxy_economics_cold_start_time_ratio", "Mean cold-start seconds / median "
             "request seconds.", o.cold_start_time_ratio),
            ("edge_proxy_joules_per_request", "Mean full-attribution joules per user request "
             "over the window.", o.joules_per_request),
        ]
        for name, doc, fn in fams:
            g = GaugeMetricFamily(name, doc, labels=["model"])
            for m in models:
                try:
                    g.add_metric([m], float(fn(m)))
                except Exception:           # never fail a scrape
                    g.add_metric([m], math.nan)
            yield g
        g = GaugeMetricFamily("edge_proxy_quality_static_score", "Configured quality score "
                              "(0..1).", labels=["model"])
        for m in models:
            s = o.static_score(m)
            if s is not None:
                g.add_metric([m], s)
        yield g
        g = GaugeMetricFamily("edge_proxy_model_weight_bytes", "Bytes of model weights: "
                              "measured (backend /info), configured, or nominal (paper table).",
                              labels=["model", "backend", "source"])
        for m in models:
            gb, src = o.weight_gigabytes(m)
            if not math.isnan(gb):
                g.add_metric([m, o.backend, src], gb * 1e9)
        yield g
        yield self._sources_info(models)
        g = GaugeMetricFamily("edge_proxy_economics_info", "Economics mode and prices.",
                              labels=["mode"])
        g.add_metric([o.cfg.mode], 1.0)
        yield g
        prices = GaugeMetricFamily("edge_proxy_price_usd", "The configured price sheet.",
                                   labels=["item"])
        c = o.cfg
        for item, v in (("per_kwh", c.usd_per_kwh), ("gpu_per_hour", c.gpu_usd_per_hour),
                        ("api_per_million_input_tokens", c.api_usd_per_million_input_tokens),
                        ("api_per_million_output_tokens", c.api_usd_per_million_output_tokens),
                        ("api_per_request_paper", c.api_cost_per_request_usd)):
            prices.add_metric([item], v)
        yield prices


def create_economics(runtime: Any, gate: Any = None, energy: Any = None) -> EconomicsObserver:
    """Factory called by ``edge_proxy.proxy.server.build_proxy``: creates the observer on the runtime's
    registry, appends it to ``runtime.observers``, registers ``POST /edge/feedback`` and the
    background tasks (backend /info poll, quality probes). ``gate``: the cold-start gate (or
    None); ``energy``: the energy component (or None)."""
    obs = EconomicsObserver(runtime.settings, runtime.registry, gate=gate, energy=energy)
    obs.runtime = runtime
    runtime.observers.append(obs)
    runtime.components["economics"] = obs
    obs.register_routes(runtime.app)
    runtime.app.on_startup.append(obs.on_startup)
    runtime.app.on_cleanup.append(obs.on_cleanup)
    return obs
