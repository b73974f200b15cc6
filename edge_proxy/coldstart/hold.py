"""Admission and the hold queue: the bounded FIFO of requests that wait for a cold start.

* a request is admitted while fewer than ``max_pending`` requests and ``max_held_bytes`` request
  bytes are held; otherwise it gets :class:`~edge_proxy.proxy.hooks.GateRejected` (``hold_full``, 503);
  while the proxy drains it gets ``draining`` (503 + Retry-After);
* an admitted request waits at most ``max_wait_seconds`` (+1 s: the cold-start driver rejects
  everything held first, so counters and 503s agree; this limit is the safety net behind it);
* held requests are released in bursts of ``release_burst``, ``release_interval_seconds`` apart,
  or handed back together with one reason.

Owns: the queue, the held bytes, the ``pending``/``held_bytes`` gauges and the ``rejected`` counter.
Must not: probe the backend, start or stop processes, or fill cold-start records beyond counting
what it released into them.
"""
from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from edge_proxy.coldstart.metrics import ColdStartMetrics
from edge_proxy.coldstart.record import ColdStart
from edge_proxy.config import ColdStartSettings
from edge_proxy.proxy.hooks import GateRejected, RequestRecord

REQUEST_BYTES_KEY = "request_bytes"       # rec.extra: the request body's size, set by the proxy
DRAINING_MESSAGE = "the proxy is shutting down; retry (another replica serves it)"


@dataclass
class Waiter:
    rec: RequestRecord
    fut: asyncio.Future[ColdStart | None]
    t_enq_ns: int
    nbytes: int = 0


class HoldQueue:
    """The held requests, in arrival order. Event loop only."""

    def __init__(self, settings: ColdStartSettings, metrics: ColdStartMetrics) -> None:
        self.s = settings
        self.m = metrics
        self._waiters: deque[Waiter] = deque()
        self.held_bytes = 0

    def __len__(self) -> int:
        return len(self._waiters)

    @property
    def first_enqueued_ns(self) -> int | None:
        return self._waiters[0].t_enq_ns if self._waiters else None

    def records(self) -> list[RequestRecord]:
        """The held requests' records, in arrival order."""
        return [w.rec for w in self._waiters]

    def admit(self, rec: RequestRecord, now_ns: int, closing: bool) -> Waiter:
        """Queue ``rec`` or raise GateRejected (draining, hold_full)."""
        if closing:
            self.m.rejected.labels(reason="draining").inc()
            raise GateRejected("draining", DRAINING_MESSAGE, self.s.retry_after_seconds)
        if len(self._waiters) >= self.s.max_pending:
            self.m.rejected.labels(reason="hold_full").inc()
            raise GateRejected(
                "hold_full",
                f"the backend is starting and {len(self._waiters)} requests are already waiting "
                f"(max pending {self.s.max_pending}); retry later", self.s.retry_after_seconds,
            )
        nbytes = rec.extra.get(REQUEST_BYTES_KEY, 0)
        nbytes = nbytes if isinstance(nbytes, int) else 0
        if self.held_bytes + nbytes > self.s.max_held_bytes:
            self.m.rejected.labels(reason="hold_full").inc()
            raise GateRejected(
                "hold_full",
                f"the backend is starting and {self.held_bytes} request bytes are already held "
                f"(max held bytes {self.s.max_held_bytes}); retry later", self.s.retry_after_seconds,
            )
        w = Waiter(rec, asyncio.get_running_loop().create_future(), now_ns, nbytes)
        self._waiters.append(w)
        self.held_bytes += nbytes
        self._set_pending()
        return w

    async def wait(self, w: Waiter) -> ColdStart | None:
        """Wait for ``w`` to be released (its cold start, or None) or rejected (raised)."""
        try:
            done, _ = await asyncio.wait({w.fut}, timeout=self.s.max_wait_seconds + 1.0)
        except asyncio.CancelledError:
            self.remove(w)
            if not w.fut.done():
                w.fut.cancel()
            raise
        if not done:
            self.remove(w)
            w.fut.cancel()
            self.m.rejected.labels(reason="hold_timeout").inc()
            raise GateRejected(
                "hold_timeout",
                f"the backend did not become ready within {self.s.max_wait_seconds:g} s (max wait); retry later",
            )
        exc = w.fut.exception()
        if exc is not None:
            raise exc
        return w.fut.result()

    async def release_all(self, cs: ColdStart | None) -> None:
        """Release everything held, in bursts; each released request counts in ``cs.released``."""
        burst = max(1, self.s.release_burst)
        while self._waiters:
            n = 0
            while self._waiters and n < burst:
                w = self._waiters.popleft()
                self.held_bytes -= w.nbytes
                if not w.fut.done():
                    w.fut.set_result(cs)
                    n += 1
                    if cs is not None:
                        cs.released += 1
            self._set_pending()
            if self._waiters:
                await asyncio.sleep(self.s.release_interval_seconds)

    def reject_all(self, reason: str, message: str, retry_after_seconds: int | None = None) -> None:
        n = 0
        while self._waiters:
            w = self._waiters.popleft()
            self.held_bytes -= w.nbytes
            if not w.fut.done():
                w.fut.set_exception(GateRejected(reason, message, retry_after_seconds))
                n += 1
        if n:
            self.m.rejected.labels(reason=reason).inc(n)
        self._set_pending()

    def remove(self, w: Waiter) -> None:
        try:
            self._waiters.remove(w)
            self.held_bytes -= w.nbytes
        except ValueError:
            pass
        self._set_pending()

    def _set_pending(self) -> None:
        self.m.pending.set(len(self._waiters))
        self.m.held_bytes.set(self.held_bytes)
