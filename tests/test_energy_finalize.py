"""The energy observer's finalize is woken by the ledger when the request's energy turns final,
not by a timer: under load the tick that settles a request is often the second one after its end
(the first still overlaps requests in flight), and finalize must return as soon as that tick is
split, whatever the sampling period."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from edge_proxy.energy.ledger import Ledger
from edge_proxy.energy.observer import EnergyObserver
from edge_proxy.energy.readings import Tick
from edge_proxy.proxy.hooks import RequestRecord

pytestmark = pytest.mark.asyncio


def _tick(t0: int, t1: int, joules: float) -> Tick:
    return Tick(t0, t1, joules, {"GPU-x": joules})


def _rec(rid: str, t_ns: int) -> RequestRecord:
    # streamed (token times known): a tick is split once the requests in it are known, not only
    # once they all ended
    return RequestRecord(request_id=rid, route="/v1/completions", api="openai", stream=True,
                         t_received_ns=t_ns, t_forwarded_ns=t_ns)


async def test_finalize_returns_when_the_settling_tick_lands_from_another_thread():
    # A 10 s period: a timer-driven wait would sleep until the next period is due (seconds).
    ledger = Ledger(idle_watts=0.0)
    obs = EnergyObserver(ledger, "nvml", period_seconds=10.0, finalize_wait_seconds=30.0)
    now = time.monotonic_ns()
    ledger.add_tick(_tick(now - 2_000_000_000, now - 1_000_000_000, 0.0))   # the source is alive
    a, b = _rec("a", now), _rec("b", now)
    obs.on_request_start(a)
    obs.on_request_start(b)
    a.t_end_ns = now + 5_000_000
    obs.on_request_end(a)
    # the tick covering a's end also covers b, still in flight: it stays pending, a is not final
    ledger.add_tick(_tick(now - 1_000_000_000, now + 10_000_000, 4.0))
    assert not ledger.is_final("a")

    fin = asyncio.create_task(obs.finalize(a))
    await asyncio.sleep(0.05)
    assert not fin.done()                              # waiting, not given up

    # the next tick arrives on the sampler's thread, past b's prefill window (80 ms): it settles
    # the pending one and a turns final
    t_sent = time.monotonic()
    th = threading.Thread(target=ledger.add_tick, args=(_tick(now + 10_000_000, now + 100_000_000, 1.0),))
    th.start()
    await asyncio.wait_for(fin, 2.0)
    th.join()
    assert time.monotonic() - t_sent < 2.0
    assert a.energy is not None and not a.energy.provisional
    assert a.energy.active_joules > 0


async def test_finalize_gives_up_when_the_source_is_silent():
    ledger = Ledger(idle_watts=0.0)
    obs = EnergyObserver(ledger, "nvml", period_seconds=0.01, finalize_wait_seconds=30.0)
    now = time.monotonic_ns()
    ledger.add_tick(_tick(now - 20_000_000, now - 10_000_000, 0.0))
    a, b = _rec("a", now), _rec("b", now)
    obs.on_request_start(a)
    obs.on_request_start(b)
    a.t_end_ns = now + 1_000_000
    obs.on_request_end(a)
    t0 = time.monotonic()
    # no tick ever comes: finalize keeps the provisional estimate once the source counts as
    # silent (max(1 s, 5 periods) after its newest tick), well before finalize_wait_seconds
    await asyncio.wait_for(obs.finalize(a), 5.0)
    assert time.monotonic() - t0 < 5.0
    assert a.energy is not None and a.energy.provisional
    assert not obs._waiters                            # nothing left behind
