"""The energy ledger: per-request joules that add up to what was measured.

Ticks (from the sampler thread) and request events (from the event loop) meet here under one lock.
A tick is split (see :mod:`edge_proxy.energy.apportion`) once it is *settled* and its weights are
known:

- settled: a later tick has arrived (so late token events had one period to land), or every
  request overlapping it has ended;
- weights known: a request whose prefill window (the 80 ms before its first token) overlaps the
  tick needs its prompt-token count; a request still before its first token must be past the
  window's reach; a request with unknown token times (non-streaming) needs its end and totals.
  OpenAI streams report usage last, so such ticks wait (deferred) until the request ends or its
  count is set.
- a tick waits at most ``max_defer_seconds`` and the ledger holds at most ``max_pending_ticks``:
  past either bound the oldest tick is split with what is known (unknown prompt counts weigh 0,
  unknown non-streaming weights take the mean of the others), so memory stays bounded.

Cost: request events (``start``/``tokens``/``end``, event loop) are O(1); splitting and finality
run when a tick arrives (sampler thread), off the event loop. ``end`` settles at once only when the
tick after the end has already closed.

A request's energy is *final* once it has ended, a tick closing after its end has arrived, and no
pending tick overlaps it. Idle power: configured, or learned as the median power of recent ticks
with nothing in flight (preferring ticks at least ``idle_settle_seconds`` after the last busy one,
so the power tail after a burst is not taken for idle).

Conservation (tested on every path): measured = sum(active) + sum(idle) + pending, where pending
is the energy of ticks received but not yet split.
"""
from __future__ import annotations

import logging
import statistics
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

from edge_proxy.energy.apportion import (
    METHODS, TIME_WEIGHTED, TOKEN_WEIGHTED, Deferred, ReqView, TickSplit, split_tick)
from edge_proxy.energy.readings import Tick

log = logging.getLogger(__name__)


@dataclass
class RequestEnergy:
    """A request's attributed energy as the ledger knows it now."""

    active_joules: float
    full_joules: float
    attribution: str
    final: bool


@dataclass
class _Req:
    view: ReqView
    model: str
    attribution: str
    forwarded: Callable[[], int | None] | None = None   # when the request left for the backend
    active: float = 0.0
    full: float = 0.0
    final: bool = False
    released: bool = False


@dataclass
class LedgerTotals:
    measured_joules: float = 0.0          # every tick received
    measured_by_gpu: dict[str, float] = field(default_factory=dict)
    pending_joules: float = 0.0           # received, not split yet
    idle_joules: float = 0.0              # idle_k of split ticks (all idle power)
    idle_unattributed_joules: float = 0.0 # idle not carried by any request's full energy
    active_joules: float = 0.0            # sum of active shares
    full_joules: float = 0.0              # sum of full shares
    ticks_split: int = 0
    ticks_forced: int = 0
    ticks_gap: int = 0
    by_model: dict[tuple[str, str], list[float]] = field(default_factory=dict)   # (model, attribution) -> [active, full]
    idle_watts: float | None = None


class Ledger:
    def __init__(self, idle_watts: float | None = None, prefill_weight: float = 1.0,
                 method: str = TOKEN_WEIGHTED, max_defer_seconds: float = 30.0,
                 max_pending_ticks: int = 4096, max_done: int = 10_000,
                 idle_window: int = 64, idle_settle_seconds: float = 1.0,
                 prefill_window_seconds: float = 0.08) -> None:
        if method not in METHODS:
            raise ValueError(f"attribution must be one of {', '.join(METHODS)}, got {method!r}")
        if idle_watts is not None and idle_watts < 0:
            raise ValueError(f"idle watts must be >= 0, got {idle_watts}")
        if prefill_weight < 0:
            raise ValueError(f"prefill weight must be >= 0, got {prefill_weight}")
        self.method = method
        self.prefill_weight = float(prefill_weight)
        self.configured_idle_watts = idle_watts
        self.max_defer_ns = int(max_defer_seconds * 1e9)
        self.max_pending = max(1, max_pending_ticks)
        self.max_done = max_done
        self.idle_settle_ns = int(idle_settle_seconds * 1e9)
        self.prefill_window_ns = int(prefill_window_seconds * 1e9)
        self._lock = threading.RLock()
        self._active: dict[str, _Req] = {}
        self._done: OrderedDict[str, _Req] = OrderedDict()
        self._pending: deque[Tick] = deque()
        self._newest_t1: int | None = None
        self._last_tick: Tick | None = None
        self._last_busy_t1: int | None = None
        self._idle_settled: deque[float] = deque(maxlen=idle_window)
        self._idle_any: deque[float] = deque(maxlen=idle_window)
        self.totals = LedgerTotals()
        # called (from whichever thread fed the ledger, outside its lock) after requests turned
        # final: lets a waiter wake once when its request is final instead of polling
        self.final_listeners: list[Callable[[], None]] = []
        self._turned_final = False

    # -- idle power ------------------------------------------------------------------------
    @property
    def idle_watts(self) -> float:
        """P_idle: configured, else the median of recent idle ticks' power, else 0 W."""
        if self.configured_idle_watts is not None:
            return self.configured_idle_watts
        src = self._idle_settled or self._idle_any
        return statistics.median(src) if src else 0.0

    def _learn_idle(self, tick: Tick) -> None:
        if self.configured_idle_watts is not None or tick.gap or tick.t1_ns <= tick.t0_ns:
            return
        p = tick.joules / tick.dt_seconds
        self._idle_any.append(p)
        if self._last_busy_t1 is None or tick.t0_ns - self._last_busy_t1 >= self.idle_settle_ns:
            self._idle_settled.append(p)

    # -- request events (event loop) -------------------------------------------------------
    def start(self, rid: str, t_ns: int, model: str = "unknown", stream: bool = True,
              forwarded: Callable[[], int | None] | None = None) -> None:
        """Open a request at ``t_ns``. ``forwarded`` (optional) tells when the request was sent to
        the backend (None while a cold-start gate holds it): the request is in flight from then on,
        so a held request carries no energy of the cold start it waits through."""
        with self._lock:
            token_known = stream and self.method == TOKEN_WEIGHTED
            attribution = TOKEN_WEIGHTED if token_known else TIME_WEIGHTED
            self._active[rid] = _Req(ReqView(rid, t_ns, None, stream, events=[]), model, attribution,
                                     forwarded)

    def tokens(self, rid: str, n: int, t_ns: int, prompt_tokens: int | None = None) -> None:
        with self._lock:
            r = self._active.get(rid)
            if r is None or n <= 0:
                return
            v = r.view
            if v.first_token_ns is None:
                v.first_token_ns = t_ns
            assert v.events is not None
            v.events.append((t_ns, int(n)))
            if prompt_tokens is not None:
                v.prompt_tokens = int(prompt_tokens)

    def set_prompt_tokens(self, rid: str, n: int | None) -> None:
        if n is None:
            return
        with self._lock:
            r = self._active.get(rid)
            if r is not None:
                r.view.prompt_tokens = int(n)

    def set_model(self, rid: str, model: str) -> None:
        with self._lock:
            r = self._active.get(rid)
            if r is not None:
                r.model = model

    def end(self, rid: str, t_ns: int, prompt_tokens: int | None = None,
            output_tokens: int | None = None, now_ns: int | None = None) -> None:
        with self._lock:
            r = self._active.get(rid)
            if r is None:
                return
            v = r.view
            v.end_ns = max(t_ns, v.start_ns)
            if prompt_tokens is not None:
                v.prompt_tokens = int(prompt_tokens)
            if output_tokens is not None:
                v.output_tokens = int(output_tokens)
            # O(1) on the event loop: pending ticks are split and requests turn final when the next
            # tick arrives (sampler thread), which is also when a request ending after the newest
            # tick can turn final. Only when the tick after the end has already closed (the end was
            # stamped before the newest tick arrived) is there something to settle now.
            if self._newest_t1 is not None and v.end_ns < self._newest_t1:
                self._resolve(now_ns if now_ns is not None else self._newest_t1)
        self._notify_final()

    # -- ticks (sampler thread) ------------------------------------------------------------
    def add_tick(self, tick: Tick, now_ns: int | None = None) -> None:
        with self._lock:
            self.totals.measured_joules += tick.joules
            for u, j in tick.joules_by_gpu.items():
                self.totals.measured_by_gpu[u] = self.totals.measured_by_gpu.get(u, 0.0) + j
            self.totals.pending_joules += tick.joules
            if tick.gap:
                self.totals.ticks_gap += 1
            self._pending.append(tick)
            if self._newest_t1 is None or tick.t1_ns > self._newest_t1:
                self._newest_t1 = tick.t1_ns
                self._last_tick = tick
            self._resolve(tick.t1_ns if now_ns is None else now_ns)
        self._notify_final()

    def resolve(self, now_ns: int) -> None:
        with self._lock:
            self._resolve(now_ns)
        self._notify_final()

    def flush(self) -> None:
        """Split every pending tick now with what is known (shutdown, end of a test)."""
        with self._lock:
            while self._pending:
                self._split(self._pending.popleft(), forced=True)
            self._update_finality()
        self._notify_final()

    def _notify_final(self) -> None:
        with self._lock:
            turned, self._turned_final = self._turned_final, False
        if turned:
            for fn in self.final_listeners:
                try:
                    fn()
                except Exception:  # noqa: BLE001 - a listener must not break the sampler
                    log.exception("ledger final listener failed")

    # -- internals -------------------------------------------------------------------------
    @staticmethod
    def _in_flight_view(r: _Req) -> bool:
        """Move the request's start to when it was forwarded; False while it is held (not sent yet)."""
        if r.forwarded is None:
            return True
        fwd = r.forwarded()
        v = r.view
        if fwd is None:
            if v.end_ns is None:
                return False             # held by the gate: not in flight yet
            v.start_ns = v.end_ns        # ended without being sent (rejected): no time in flight
            return True
        if fwd > v.start_ns:
            v.start_ns = fwd if v.end_ns is None else min(fwd, v.end_ns)
        return True

    def _overlapping(self, tick: Tick) -> list[_Req]:
        return [r for r in self._active.values()
                if self._in_flight_view(r) and r.view.overlaps(tick.t0_ns, tick.t1_ns)]

    def _split(self, tick: Tick, forced: bool) -> bool:
        reqs = self._overlapping(tick)
        settled = (self._newest_t1 is not None and self._newest_t1 > tick.t1_ns) or \
            all(r.view.end_ns is not None for r in reqs)
        if not settled and not forced:
            return False
        try:
            res: TickSplit = split_tick(tick.t0_ns, tick.t1_ns, tick.joules, [r.view for r in reqs],
                                        self.idle_watts, self.method, self.prefill_weight, forced,
                                        self.prefill_window_ns, self._newest_t1)
        except Deferred:
            return False
        t = self.totals
        t.pending_joules -= tick.joules
        if abs(t.pending_joules) < 1e-9 and not self._pending:
            t.pending_joules = 0.0
        t.ticks_split += 1
        t.ticks_forced += int(forced)
        t.idle_joules += res.idle
        t.idle_unattributed_joules += res.idle_unattributed
        if not reqs:
            held = any(r.view.start_ns < tick.t1_ns and r.view.end_ns is None and not self._in_flight_view(r)
                       for r in self._active.values())
            if not held:                 # a cold start (requests held) is not idle power
                self._learn_idle(tick)
        else:
            self._last_busy_t1 = max(self._last_busy_t1 or tick.t1_ns, tick.t1_ns)
        for r in reqs:
            a = res.active.get(r.view.rid, 0.0)
            f = a + res.idle_by_request.get(r.view.rid, 0.0)
            r.active += a
            r.full += f
            t.active_joules += a
            t.full_joules += f
            acc = t.by_model.setdefault((r.model, r.attribution), [0.0, 0.0])
            acc[0] += a
            acc[1] += f
        return True

    def _resolve(self, now_ns: int) -> None:
        # bound memory: force the oldest ticks past the limits
        while self._pending and (len(self._pending) > self.max_pending or
                                 now_ns - self._pending[0].t1_ns > self.max_defer_ns):
            self._split(self._pending.popleft(), forced=True)
        if self._pending:
            keep: deque[Tick] = deque()
            for tick in self._pending:
                if not self._split(tick, forced=False):
                    keep.append(tick)
            self._pending = keep
        self._update_finality()

    def _update_finality(self) -> None:
        newest = self._newest_t1
        if newest is None:
            return
        horizon = self._pending[0].t0_ns if self._pending else newest
        for rid in [rid for rid, r in self._active.items() if r.view.end_ns is not None]:
            r = self._active[rid]
            v = r.view
            assert v.end_ns is not None
            if newest <= v.end_ns:
                continue
            if any(v.overlaps(tk.t0_ns, tk.t1_ns) for tk in self._pending):
                continue
            r.final = True
            self._turned_final = True
            del self._active[rid]
            if not r.released:
                self._done[rid] = r
                while len(self._done) > self.max_done:
                    self._done.popitem(last=False)
        # trim token events nobody can need any more
        for r in self._active.values():
            ev = r.view.events
            if ev and len(ev) > 64 and ev[0][0] < horizon:
                r.view.events = [e for e in ev if e[0] >= horizon]
        self.totals.idle_watts = self.idle_watts

    # -- queries ---------------------------------------------------------------------------
    def result(self, rid: str) -> RequestEnergy | None:
        with self._lock:
            r = self._active.get(rid) or self._done.get(rid)
            if r is None:
                return None
            return RequestEnergy(r.active, r.full, r.attribution, r.final)

    def is_final(self, rid: str) -> bool:
        with self._lock:
            return rid in self._done or (rid not in self._active)

    def release(self, rid: str) -> RequestEnergy | None:
        """Hand back a request's result and forget it (or forget it once it turns final)."""
        with self._lock:
            r = self._done.pop(rid, None)
            if r is None:
                r = self._active.get(rid)
                if r is not None:
                    r.released = True
            return None if r is None else RequestEnergy(r.active, r.full, r.attribution, r.final)

    def estimate(self, rid: str, now_ns: int) -> RequestEnergy | None:
        """Provisional energy: split so far + pending ticks split as if now (forced) + the time since
        the newest tick at the newest tick's power, shared equally with the other requests in flight."""
        with self._lock:
            r = self._active.get(rid) or self._done.get(rid)
            if r is None:
                return None
            if r.final:
                return RequestEnergy(r.active, r.full, r.attribution, True)
            active, full = r.active, r.full
            for tick in self._pending:
                reqs = self._overlapping(tick)
                if r not in reqs:
                    continue
                res = split_tick(tick.t0_ns, tick.t1_ns, tick.joules, [x.view for x in reqs],
                                 self.idle_watts, self.method, self.prefill_weight, True,
                                 self.prefill_window_ns, self._newest_t1)
                a = res.active.get(rid, 0.0)
                active += a
                full += a + res.idle_by_request.get(rid, 0.0)
            newest = self._newest_t1
            end = r.view.end_ns if r.view.end_ns is not None else now_ns
            last = self._last_tick
            if newest is not None and end > newest:
                power = (last.joules / last.dt_seconds) if last is not None and last.dt_seconds > 0 else 0.0
                n = sum(1 for x in self._active.values() if x.view.end_ns is None or x.view.end_ns > newest)
                tail = power * (end - max(newest, r.view.start_ns)) / 1e9 / max(1, n)
                idle_part = min(tail, self.idle_watts * (end - max(newest, r.view.start_ns)) / 1e9 / max(1, n))
                active += tail - idle_part
                full += tail
            return RequestEnergy(active, full, r.attribution, False)

    def snapshot(self) -> LedgerTotals:
        with self._lock:
            t = self.totals
            return LedgerTotals(t.measured_joules, dict(t.measured_by_gpu), t.pending_joules, t.idle_joules, t.idle_unattributed_joules,
                                t.active_joules, t.full_joules, t.ticks_split, t.ticks_forced, t.ticks_gap,
                                {k: list(v) for k, v in t.by_model.items()}, self.idle_watts)

    @property
    def newest_tick_end_ns(self) -> int | None:
        """t1 of the newest tick received (None before the first)."""
        with self._lock:
            return self._newest_t1

    @property
    def pending_ticks(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def requests_in_flight(self) -> int:
        with self._lock:
            return len(self._active)
