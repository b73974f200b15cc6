"""Pauses of Python's cyclic garbage collector in the proxy process, as a Prometheus histogram.

A collection holds the interpreter (and so the event loop) for its whole run, and its cost grows
with the objects alive: at 1,000 concurrent streams a full (generation 2) collection of the proxy's
~120,000 tracked objects took 90-160 ms of CPU on a 2-core VM (docs/benchmarks.md, Energy ledger
under load), about half of its event-loop stalls over 50 ms. ``edge_proxy_gc_pause_seconds``
{generation} records every collection's duration (monotonic clock, measured) so that a stall in
``edge_proxy_event_loop_lag_seconds`` can be told apart from slow request handling.

Owns one ``gc.callbacks`` entry per runtime (added at start-up, removed at clean-up) and the
histogram. Must not change the collector's settings.
"""
from __future__ import annotations

import gc
import time
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class GcPauseMonitor:
    """``start()`` registers the collector callback, ``stop()`` removes it (both idempotent)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.histogram = Histogram(
            "edge_proxy_gc_pause_seconds",
            "Duration of each cyclic garbage collection in the proxy process, by generation "
            "(measured; the event loop waits for it)",
            ["generation"], buckets=BUCKETS, registry=registry)
        self._children = [self.histogram.labels(generation=str(g)) for g in range(3)]
        self._started: float | None = None

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self._children[info["generation"]].observe(time.perf_counter() - self._started)
            self._started = None

    async def start(self, app: Any = None) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    async def stop(self, app: Any = None) -> None:
        while self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)


def attach_gc_pause(runtime: Any) -> GcPauseMonitor:
    """Register the monitor on the runtime's registry and its public app's start-up and clean-up."""
    monitor = GcPauseMonitor(runtime.registry)
    runtime.app.on_startup.append(monitor.start)
    runtime.app.on_cleanup.append(monitor.stop)
    return monitor
