"""The proxy's GC pause histogram: one observation per collection, in the collected generation, and
the callback gone after clean-up; a running proxy exports it on /metrics."""
from __future__ import annotations

import asyncio
import gc

from prometheus_client import CollectorRegistry

from edge_proxy.telemetry.gc_pause import GcPauseMonitor


def _counts(registry: CollectorRegistry) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in registry.collect():
        if fam.name == "edge_proxy_gc_pause_seconds":
            for s in fam.samples:
                if s.name.endswith("_count"):
                    out[s.labels["generation"]] = s.value
    return out


def test_each_collection_is_observed_in_its_generation_until_stopped() -> None:
    reg = CollectorRegistry()
    mon = GcPauseMonitor(reg)
    asyncio.run(mon.start())
    try:
        before = _counts(reg)
        gc.collect(1)
        gc.collect(2)
        gc.collect(2)
        after = _counts(reg)
    finally:
        asyncio.run(mon.stop())
    assert after["1"] - before["1"] >= 1
    assert after["2"] - before["2"] >= 2
    assert mon._callback not in gc.callbacks
    gc.collect(2)
    assert _counts(reg)["2"] == after["2"]              # stopped: nothing more observed
