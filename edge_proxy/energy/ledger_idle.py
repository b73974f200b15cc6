"""Idle power P_idle for the ledger: configured, or learned, and how it was obtained.

- configured (``--idle-watts``): used as is (``idle_power_source="configured"``);
- else the median power of the last ``window`` ticks where the source said the GPU was at rest
  (NVML utilization 0 on every GPU: ``learned_at_rest``);
- else, for sources that cannot tell (estimated, remote, old traces), the median power of recent
  ticks with nothing in flight, preferring those at least ``settle`` after the last busy tick so the
  power tail after a burst is not taken for idle (``learned_no_requests``);
- else 0 W (``default``).
A tick the source calls busy never teaches idle power, whatever this proxy had in flight: other
clients of the same GPU would otherwise set idle power to their load. Gap ticks never teach it.
A shared source's tick (several proxies on one counter) holds ``share`` of the power: P = E / (dt * share);
ticks where this proxy held under 5 % teach nothing (too little energy to learn from).
"""
from __future__ import annotations

import statistics
from collections import deque

from edge_proxy.energy.readings import Tick


class IdlePower:
    def __init__(self, configured: float | None, window: int = 64, settle_ns: int = 1_000_000_000) -> None:
        self.configured = configured
        self.settle_ns = settle_ns
        self.at_rest: deque[float] = deque(maxlen=window)
        self.settled: deque[float] = deque(maxlen=window)
        self.any: deque[float] = deque(maxlen=window)
        self.last_busy_t1: int | None = None
        self.watts, self.source = self._current()

    def _current(self) -> tuple[float, str]:
        if self.configured is not None:
            return self.configured, "configured"
        if self.at_rest:
            return statistics.median(self.at_rest), "learned_at_rest"
        src = self.settled or self.any
        if src:
            return statistics.median(src), "learned_no_requests"
        return 0.0, "default"

    def busy_until(self, t1_ns: int) -> None:
        """A tick ending at ``t1_ns`` had requests of this proxy in flight."""
        self.last_busy_t1 = max(self.last_busy_t1 or t1_ns, t1_ns)

    def learn(self, tick: Tick, nothing_in_flight: bool) -> None:
        """Learn from a split tick (see the module docstring)."""
        if self.configured is not None or tick.gap or tick.t1_ns <= tick.t0_ns or tick.share < 0.05:
            return
        p = tick.joules / tick.idle_seconds      # a shared source's tick holds only its share of the power
        if tick.at_rest is True:
            self.at_rest.append(p)
        elif tick.at_rest is None and nothing_in_flight:
            self.any.append(p)
            if self.last_busy_t1 is None or tick.t0_ns - self.last_busy_t1 >= self.settle_ns:
                self.settled.append(p)
        else:
            return
        self.watts, self.source = self._current()
