"""The sliding window of economics inputs per model: served requests, quality scores, cold starts.

Owns the raw samples, their pruning to ``economics.window_seconds``, the served-request counts and
the busy-time clock. Must not compute metrics (:mod:`.stats` does, once per scrape) and must not
import prometheus_client.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

MAX_WINDOW_SAMPLES = 100_000
MAX_COLD_STARTS = 100               # cold starts are rare: the last 100, whatever their age
ALL_MODELS = "*"                    # cold starts of the backend (every model it serves)


@dataclass(frozen=True)
class RequestSample:
    """One served request as economics saw it (energy final)."""

    t_ns: int                       # monotonic clock when economics recorded it
    joules: float | None            # full-attribution joules; None when no energy source covers it
    input_tokens: int
    output_tokens: int
    local_cost_usd: float           # energy cost + hardware-time cost
    api_cost_usd: float
    duration_seconds: float


@dataclass(frozen=True)
class ScoreSample:
    t_ns: int
    score: float                    # 0..1
    source: str                     # feedback | probe


@dataclass(frozen=True)
class ColdStartSample:
    t_ns: int
    joules: float | None
    seconds: float


class BusyClock:
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


@dataclass(frozen=True)
class ModelWindow:
    """One model's window at one instant: the input of :func:`edge_proxy.economics.stats.compute`."""

    model: str
    now_ns: int
    requests: tuple[RequestSample, ...]
    scores: tuple[ScoreSample, ...]
    cold_starts: tuple[ColdStartSample, ...]     # the model's and the backend's (``*``)
    served: int                                  # requests served since start (not windowed)
    cold_start_cost_usd: float                   # since start (part of C_fixed in production)


class EconomicsWindow:
    """Per-model deques of samples. ``window_seconds`` is read on every prune (the price-sheet
    reload may change it)."""

    def __init__(self, window_seconds: Callable[[], float], clock_ns: Callable[[], int]) -> None:
        self.window_seconds = window_seconds
        self.clock_ns = clock_ns
        self.requests: dict[str, deque[RequestSample]] = {}
        self.scores: dict[str, deque[ScoreSample]] = {}
        self.cold: dict[str, deque[ColdStartSample]] = {}
        self.served: dict[str, int] = {}
        self.cold_cost_usd: dict[str, float] = {}

    def _horizon(self, now_ns: int) -> int:
        return now_ns - int(self.window_seconds() * 1e9)

    def add_request(self, model: str, sample: RequestSample) -> None:
        self.served[model] = self.served.get(model, 0) + 1
        win = self.requests.setdefault(model, deque(maxlen=MAX_WINDOW_SAMPLES))
        win.append(sample)
        self._prune(win, sample.t_ns)

    def add_score(self, model: str, sample: ScoreSample) -> None:
        self.scores.setdefault(model, deque(maxlen=MAX_WINDOW_SAMPLES)).append(sample)

    def add_cold_start(self, key: str, sample: ColdStartSample, cost_usd: float) -> None:
        """``key``: a model, or :data:`ALL_MODELS` for the backend's cold start."""
        self.cold.setdefault(key, deque(maxlen=MAX_COLD_STARTS)).append(sample)
        if cost_usd:
            self.cold_cost_usd[key] = self.cold_cost_usd.get(key, 0.0) + cost_usd

    def _prune(self, win: deque[RequestSample] | deque[ScoreSample], now_ns: int) -> None:
        horizon = self._horizon(now_ns)
        while win and win[0].t_ns < horizon:
            win.popleft()

    def models(self) -> set[str]:
        return set(self.served) | set(self.scores) | {m for m in self.cold if m != ALL_MODELS}

    def view(self, model: str) -> ModelWindow:
        """The model's samples now (pruned), copied once."""
        now = self.clock_ns()
        reqs = self.requests.get(model)
        if reqs:
            self._prune(reqs, now)
        sc = self.scores.get(model)
        if sc:
            self._prune(sc, now)
        cold = tuple(self.cold.get(model, ())) + tuple(self.cold.get(ALL_MODELS, ()))
        cost = self.cold_cost_usd.get(model, 0.0) + self.cold_cost_usd.get(ALL_MODELS, 0.0)
        return ModelWindow(model, now, tuple(reqs or ()), tuple(sc or ()), cold,
                           self.served.get(model, 0), cost)
