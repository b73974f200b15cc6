"""Scale to zero: stop the supervised backend after ``idle_timeout_seconds`` without traffic
(``--idle-timeout``, needs ``--spawn``), never while a request is held or in flight or a cold
start is being driven.

Owns: the idle timer loop and the stop decision. Must not: start processes (the next request's
cold start does), or hold requests.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_proxy.coldstart.gate import ColdStartGate

log = logging.getLogger("edge_proxy.coldstart")


def can_stop(gate: ColdStartGate) -> bool:
    """A supervised backend is running and nothing needs it now (no held, in-flight or driving)."""
    sup = gate.supervisor
    if sup is None or not sup.running or len(gate.hold) or gate.in_flight > 0:
        return False
    return gate.driving is False


async def scale_to_zero(gate: ColdStartGate) -> bool:
    """Stop the supervised backend now if :func:`can_stop`. True when a process was stopped."""
    if not can_stop(gate):
        return False
    assert gate.supervisor is not None
    gate.ready = False
    await gate.supervisor.stop()
    gate.m.process_exits.labels(outcome="idle_stop").inc()
    gate.m.process_up.set(0)
    return True


async def idle_loop(gate: ColdStartGate, idle_timeout_seconds: float) -> None:
    """Check ``max(0.05, min(1, idle/4))`` s apart; stop once the last activity is ``idle`` s old."""
    idle_ns = int(idle_timeout_seconds * 1e9)
    period = max(0.05, min(1.0, idle_timeout_seconds / 4))
    while True:
        await asyncio.sleep(period)
        if not gate.ready or not can_stop(gate):
            continue
        if time.monotonic_ns() - gate.last_activity_ns < idle_ns:
            continue
        log.info("cold start: no traffic for %g s; stopping the backend (scale to zero)", idle_timeout_seconds)
        await scale_to_zero(gate)
