"""The energy ledger: per-request joules that add up to what was measured.

Ticks (from the sampler thread) and request events (from the event loop) meet here. A tick is
split (see :mod:`edge_proxy.energy.apportion`) once it is *settled* and its weights are known:

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

Threads and cost: request events (``start``/``tokens``/``end``, event loop) only append to a queue
(no lock, O(1)); the sampler thread drains the queue and does all splitting and finality under
the lock (:mod:`edge_proxy.energy.ledger_core`: per tick O(n log n) in the n requests in it;
finality per request O(ticks it overlaps)). While at least ``busy_merge_min_open`` requests are
open, consecutive ticks are split as one unit of up to ``busy_merge_seconds`` (0.5 s): the
splitting work per second then stays near O(requests in flight) instead of growing with
requests x ticks per second, at a time resolution that many concurrent requests do not need. ``is_final`` and ``release`` of a final request take
no lock either; ``snapshot`` (scrapes) reads totals published after each tick. So the event loop
never waits for a split.

A request's energy is *final* once it has ended, a tick closing after its end has arrived, and no
pending tick overlaps it. Idle power: configured; else learned as the median power of recent ticks
where the source said the GPU was at rest (NVML utilization 0); else, from sources that cannot
tell, of recent ticks with nothing in flight (preferring ticks at least ``idle_settle_seconds``
after the last busy one, so the power tail after a burst is not taken for idle). A tick where the
GPU was busy and none of this proxy's requests was in flight is *foreign* above idle power (work
the proxy does not see: other replicas, direct clients, other tenants).

Conservation (tested on every path): measured = sum(active) + sum(idle) + foreign + pending,
where pending is the energy of ticks received but not yet split.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable

from edge_proxy.energy.apportion import METHODS, TOKEN_WEIGHTED
from edge_proxy.energy.ledger_core import Core, LedgerTotals, RequestEnergy
from edge_proxy.energy.readings import Tick

__all__ = ["Ledger", "LedgerTotals", "RequestEnergy"]

log = logging.getLogger(__name__)

FOREIGN_WARN_WINDOW_NS = 60_000_000_000        # foreign share checked over this much tick time
FOREIGN_WARN_SHARE = 0.10                      # warn when foreign > 10 % of measured in a window
FOREIGN_WARN_EVERY_S = 300.0                   # at most one warning per 5 minutes


class Ledger:
    def __init__(self, idle_watts: float | None = None, prefill_weight: float = 1.0,
                 method: str = TOKEN_WEIGHTED, max_defer_seconds: float = 30.0,
                 max_pending_ticks: int = 4096, max_done: int = 10_000,
                 idle_window: int = 64, idle_settle_seconds: float = 1.0,
                 prefill_window_seconds: float = 0.08, max_queued_events: int = 20_000,
                 busy_merge_seconds: float = 0.5, busy_merge_min_open: int = 128) -> None:
        if method not in METHODS:
            raise ValueError(f"attribution must be one of {', '.join(METHODS)}, got {method!r}")
        if idle_watts is not None and idle_watts < 0:
            raise ValueError(f"idle watts must be >= 0, got {idle_watts}")
        if prefill_weight < 0:
            raise ValueError(f"prefill weight must be >= 0, got {prefill_weight}")
        self.method = method
        self.prefill_weight = float(prefill_weight)
        self.configured_idle_watts = idle_watts
        self._core = Core(idle_watts, float(prefill_weight), method, int(max_defer_seconds * 1e9),
                          max(1, max_pending_ticks), max_done, idle_window, int(idle_settle_seconds * 1e9),
                          int(prefill_window_seconds * 1e9), int(busy_merge_seconds * 1e9), busy_merge_min_open)
        self._lock = threading.RLock()
        self._queue: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._max_queued = max_queued_events
        self._open: set[str] = set()         # started, not final yet (read without the lock)
        self._published = self._core.totals.copy()
        # called (from whichever thread processed, outside the lock) with the ids of requests that
        # turned final: lets a waiter wake once when its request is final instead of polling
        self.final_listeners: list[Callable[[list[str]], None]] = []
        self._foreign_window: tuple[int, float, float] | None = None   # (t0, measured, foreign) at window start
        self._foreign_warned_at = -FOREIGN_WARN_EVERY_S

    # -- request events (event loop): queued, O(1), no lock ---------------------------------
    def _put(self, fn: Callable[..., None], *args: Any) -> None:
        self._queue.append((fn, args))
        if len(self._queue) > self._max_queued:      # no ticks for a long while: keep memory bounded
            with self._lock:
                self._drain()

    def start(self, rid: str, t_ns: int, model: str = "unknown", stream: bool = True,
              forwarded: Callable[[], int | None] | None = None, prompt_tokens: int | None = None,
              token_times: list[int] | None = None) -> None:
        """Open a request at ``t_ns``. ``forwarded`` (optional) tells when the request was sent to
        the backend (None while a cold-start gate holds it): the request is in flight from then on,
        so a held request carries no energy of the cold start it waits through. ``token_times``
        (optional): a list, appended by the caller in time order with one entry per output token,
        that the ledger reads instead of recording token events (then ``tokens`` need only be called
        for the first token and when the prompt count becomes known)."""
        self._open.add(rid)
        self._put(self._core.start, rid, t_ns, model, stream, forwarded, prompt_tokens, token_times)

    def tokens(self, rid: str, n: int, t_ns: int, prompt_tokens: int | None = None) -> None:
        self._put(self._core.tokens, rid, n, t_ns, prompt_tokens)

    def set_prompt_tokens(self, rid: str, n: int | None) -> None:
        if n is not None:
            self._put(self._core.set_prompt_tokens, rid, n)

    def set_model(self, rid: str, model: str) -> None:
        self._put(self._core.set_model, rid, model)

    def end(self, rid: str, t_ns: int, prompt_tokens: int | None = None,
            output_tokens: int | None = None, now_ns: int | None = None, model: str | None = None) -> None:
        """Stamp the end (O(1)); the tick that settles it is split on the sampler thread.
        ``model`` (optional): :meth:`set_model` first, in the same queued event."""
        self._put(self._core.end, rid, t_ns, prompt_tokens, output_tokens, model)

    # -- ticks (sampler thread) ------------------------------------------------------------
    def add_tick(self, tick: Tick, now_ns: int | None = None) -> None:
        with self._lock:
            self._drain()
            self._core.add_tick(tick)
            self._process(tick.t1_ns if now_ns is None else now_ns)
        self._notify_final()
        self._check_foreign()

    def resolve(self, now_ns: int) -> None:
        with self._lock:
            self._drain()
            self._process(now_ns)
        self._notify_final()

    def flush(self) -> None:
        """Split every pending tick now with what is known (shutdown, end of a test)."""
        with self._lock:
            self._drain()
            self._process(time.monotonic_ns(), force_all=True)
        self._notify_final()

    # -- internals (under the lock) ----------------------------------------------------------
    def _drain(self) -> None:
        q = self._queue
        while q:
            fn, args = q.popleft()
            fn(*args)
        dropped = self._core.dropped
        if dropped:
            for rid in dropped:
                self._open.discard(rid)
            dropped.clear()

    def _process(self, now_ns: int, force_all: bool = False) -> None:
        c = self._core
        c.process(now_ns, force_all)
        if c.turned_final:
            for rid in c.turned_final:
                self._open.discard(rid)
        self._published = c.totals.copy()

    def _notify_final(self) -> None:
        with self._lock:
            turned, self._core.turned_final = self._core.turned_final, []
        if turned:
            for fn in self.final_listeners:
                try:
                    fn(turned)
                except Exception:  # noqa: BLE001 - a listener must not break the sampler
                    log.exception("ledger final listener failed")

    def _check_foreign(self) -> None:
        """Warn (at most every 5 minutes) when foreign energy exceeded 10 % of the measured energy
        over the last minute of ticks: idle power and attribution stay right, but this proxy sees
        only part of the GPU's work."""
        t, newest = self._published, self._core.newest_t1
        if newest is None:
            return
        w = self._foreign_window
        if w is None:
            self._foreign_window = (newest, t.measured_joules, t.foreign_joules)
            return
        if newest - w[0] < FOREIGN_WARN_WINDOW_NS:
            return
        measured, foreign = t.measured_joules - w[1], t.foreign_joules - w[2]
        self._foreign_window = (newest, t.measured_joules, t.foreign_joules)
        now = time.monotonic()
        if measured > 0 and foreign > FOREIGN_WARN_SHARE * measured and now - self._foreign_warned_at >= FOREIGN_WARN_EVERY_S:
            self._foreign_warned_at = now
            log.warning("energy: %.0f %% of the GPU energy of the last %.0f s (%.1f J) was used by work this proxy "
                        "does not see (other proxies, direct clients, other tenants); counted as foreign, not "
                        "idle and not attributed (edge_proxy_foreign_energy_joules_total); see docs/metrics.md",
                        100 * foreign / measured, FOREIGN_WARN_WINDOW_NS / 1e9, foreign)

    # -- queries ---------------------------------------------------------------------------
    @property
    def idle_watts(self) -> float:
        """P_idle: configured, else learned (see the module docstring), else 0 W."""
        return self._core.idle.watts

    @property
    def idle_power_source(self) -> str:
        return self._published.idle_power_source

    def result(self, rid: str) -> RequestEnergy | None:
        with self._lock:
            self._drain()
            r = self._core.active.get(rid) or self._core.done.get(rid)
            return None if r is None else r.energy()

    def is_final(self, rid: str) -> bool:
        """True once the request's energy is final (or the ledger never saw it). No lock."""
        return rid not in self._open

    def release(self, rid: str) -> RequestEnergy | None:
        """Hand back a final request's result and forget it (no lock); for one not final yet, return
        None and let the ledger forget it once it turns final."""
        r = self._core.done.pop(rid, None)
        if r is not None:
            return r.energy(True)
        self._put(self._core.release, rid)
        return None

    def estimate(self, rid: str, now_ns: int, wait_seconds: float = 0.005) -> RequestEnergy | None:
        """Provisional energy (see :meth:`edge_proxy.energy.ledger_core.Core.estimate`): O(ticks
        pending). Waits at most ``wait_seconds`` for the lock (the event loop must not wait for a
        split); past that it estimates from what it can read without the lock (request events
        not drained yet are not seen; a request the ledger has not seen yet gets 0 J)."""
        c = self._core
        if self._lock.acquire(timeout=wait_seconds):
            try:
                self._drain()
                r = c.active.get(rid) or c.done.get(rid)
                return None if r is None else c.estimate(r, now_ns)
            finally:
                self._lock.release()
        r = c.active.get(rid) or c.done.get(rid)
        if r is None:
            return RequestEnergy(0.0, 0.0, TOKEN_WEIGHTED, False) if rid in self._open else None
        try:
            return c.estimate(r, now_ns, list(c.pending))
        except Exception:  # noqa: BLE001 - read while the sampler changes it: fall back to what is split
            return r.energy(False)

    def snapshot(self) -> LedgerTotals:
        """Totals as of the last processed tick (one consistent copy; no lock)."""
        return self._published

    @property
    def newest_tick_end_ns(self) -> int | None:
        """t1 of the newest tick received (None before the first)."""
        return self._core.newest_t1

    @property
    def pending_ticks(self) -> int:
        return len(self._core.pending)

    def sizes(self) -> dict[str, int]:
        """Sizes of the ledger's structures (tests: they must not grow with finished requests)."""
        with self._lock:
            c = self._core
            return {"open": len(self._open), "active": len(c.active), "done": len(c.done),
                    "pending": len(c.pending), "check": len(c.check), "queued": len(self._queue),
                    "members": sum(len(p.members or ()) for p in c.pending)}
