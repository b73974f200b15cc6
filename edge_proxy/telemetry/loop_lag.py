"""Event-loop lag of the proxy: how late its event loop runs a timer, as a Prometheus histogram.

A task sleeps ``interval`` seconds (20 ms) in a loop and observes ``max(0, elapsed - interval)``
on the loop's monotonic clock into ``edge_proxy_event_loop_lag_seconds``. Every request, stream
chunk, scrape and probe of the proxy waits behind whatever holds the loop, so this is the stall a
client sees on top of the backend; a lag bucket above 50 ms is a stall a user would notice.
Measured inside the proxy, it does not depend on a load generator's own loop.

Owns the timer task and the histogram. Must not read or change request state.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

INTERVAL_SECONDS = 0.02
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LoopLagMonitor:
    """``await start()`` on the proxy's loop, ``await stop()`` at shutdown."""

    def __init__(self, registry: CollectorRegistry, interval: float = INTERVAL_SECONDS) -> None:
        self.interval = interval
        self.histogram = Histogram(
            "edge_proxy_event_loop_lag_seconds",
            f"How late the proxy's event loop ran a {interval * 1000:.0f} ms timer (measured)",
            buckets=BUCKETS, registry=registry)
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(self.interval)
            self.histogram.observe(max(0.0, loop.time() - t0 - self.interval))

    async def start(self, app: Any = None) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="edge-proxy-loop-lag")

    async def stop(self, app: Any = None) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def attach_loop_lag(runtime: Any) -> LoopLagMonitor:
    """Register the monitor on the runtime's registry and its public app's start-up and clean-up."""
    monitor = LoopLagMonitor(runtime.registry)
    runtime.app.on_startup.append(monitor.start)
    runtime.app.on_cleanup.append(monitor.stop)
    return monitor
