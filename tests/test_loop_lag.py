"""The proxy's event-loop lag histogram sees a blocked loop, and a free loop stays in the low buckets."""
from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry

from edge_proxy.telemetry.loop_lag import LoopLagMonitor


def _buckets(registry: CollectorRegistry) -> dict[float, float]:
    out = {}
    for fam in registry.collect():
        if fam.name == "edge_proxy_event_loop_lag_seconds":
            for s in fam.samples:
                if s.name.endswith("_bucket"):
                    out[float(s.labels["le"])] = s.value
    return out


def test_a_blocked_loop_is_seen_and_a_free_one_is_not() -> None:
    async def scenario() -> tuple[dict[float, float], dict[float, float]]:
        reg = CollectorRegistry()
        mon = LoopLagMonitor(reg, interval=0.01)
        await mon.start()
        await asyncio.sleep(0.2)                      # free loop: ~20 timer runs
        free = _buckets(reg)
        time.sleep(0.3)                               # a handler that blocks the loop for 300 ms
        await asyncio.sleep(0.05)
        blocked = _buckets(reg)
        await mon.stop()
        return free, blocked

    free, blocked = asyncio.run(scenario())
    assert free[float("inf")] >= 5
    assert free[0.25] == free[float("inf")]           # nothing near a quarter second while free
    stalls = blocked[float("inf")] - blocked[0.25]    # observations above 250 ms
    assert stalls == 1, blocked
