"""The ledger driven by a REAL NVML trace: 937 counter readings recorded on an NVIDIA H200 on
2026-11-26 by benchmarks/energy_validation.py (idle, mixed load, bursts). CI has no GPU; this is
how the sampler and ledger meet a real counter's cadence (about 100 ms updates, reads that see no
change, idle near 123 W, bursts near 300 W). Requests are laid over the trace from a seeded
random arrival pattern; the counter's own delta is computed independently from the file."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from edge_proxy.energy.ledger import Ledger
from edge_proxy.energy.replay_source import ReplayReader
from edge_proxy.energy.sampler import Sampler

TRACE = Path(__file__).parent / "data" / "energy_h200_recorded.jsonl"


def counter_delta_joules(path: Path) -> float:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    good = [r for r in rows if "energy_millijoules" in r]
    (uuid,) = good[0]["energy_millijoules"]
    return (good[-1]["energy_millijoules"][uuid] - good[0]["energy_millijoules"][uuid]) / 1000.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_real_h200_trace_conserves_energy_under_random_requests(seed: int) -> None:
    reader = ReplayReader(TRACE, mode="driven", loop=False, origin_ns=0)
    assert reader.header.get("source") == "nvml"
    sampler = Sampler(reader, reader.period_seconds)
    ledger = Ledger(idle_watts=None)
    sampler.add_listener(ledger.add_tick)
    span_ns = int((reader.records[-1].t_seconds - reader.records[0].t_seconds) * 1e9)

    rnd = random.Random(seed)
    events: list[tuple[int, str, str, int]] = []       # (t_ns, kind, rid, n)
    for i in range(120):
        start = rnd.randrange(0, span_ns - 2_000_000_000)
        n_out = rnd.randint(1, 200)
        itl = rnd.randint(1_000_000, 20_000_000)
        rid = f"r{i}"
        events.append((start, "start", rid, 0))
        first = start + rnd.randint(5_000_000, 80_000_000)
        for k in range(n_out):
            events.append((first + k * itl, "token", rid, 1))
        events.append((first + n_out * itl + 1, "end", rid, rnd.randint(4, 500)))
    events.sort()

    def apply(t: int, kind: str, rid: str, n: int) -> None:
        if kind == "start":
            ledger.start(rid, t)
        elif kind == "token":
            ledger.tokens(rid, n, t)
        else:
            ledger.end(rid, t, prompt_tokens=n)

    ei = 0
    while not reader.exhausted:
        sampler.step()
        newest = ledger.newest_tick_end_ns or 0
        # feed request events up to the newest tick's end, as the event loop would
        while ei < len(events) and events[ei][0] <= newest:
            apply(*events[ei])
            ei += 1
    for ev in events[ei:]:
        apply(*ev)
    ledger.flush()

    tot = ledger.snapshot()
    measured = counter_delta_joules(TRACE)
    assert measured > 10_000                                       # a real, busy trace
    assert tot.measured_joules == pytest.approx(measured, rel=1e-9)
    assert tot.active_joules + tot.idle_joules == pytest.approx(tot.measured_joules, rel=1e-9)
    assert tot.active_joules > 0 and tot.idle_joules > 0
    results = [ledger.result(f"r{i}") for i in range(120)]
    assert all(r is not None for r in results)
    assert all(r.active_joules >= 0 and r.full_joules >= r.active_joules for r in results)
    assert sum(r.active_joules for r in results) == pytest.approx(tot.active_joules, rel=1e-9)
    # full energy adds each request's share of idle power while it ran: never more than was measured
    assert sum(r.full_joules for r in results) <= tot.measured_joules * (1 + 1e-9)
    assert ledger.idle_watts > 0
