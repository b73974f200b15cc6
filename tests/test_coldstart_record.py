"""A cold start's record finished by the recorder over a REAL recorded NVML trace (the H200 trace
replayed through the sampler): its energy is the window over [hold_start, first_token), its tax
comes from warm requests with the ledger's joules, and a window the ticks do not cover falls back
to the model server's load energy. Expected values come from the trace file, not from the ticks."""
from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from edge_proxy.coldstart.metrics import ColdStartMetrics
from edge_proxy.coldstart.phases import ColdStartTimeline
from edge_proxy.coldstart.record import ColdStart
from edge_proxy.coldstart.recording import ColdStartRecorder
from edge_proxy.proxy.hooks import EnergyAttribution, RequestRecord
from edge_proxy.energy.replay_source import ReplayReader
from edge_proxy.energy.sampler import Sampler
from tests.test_energy_window import H200, counter_curve, interp, run_trace

S = 1_000_000_000


def warm(i: int, joules: float, seconds: float, **kw: object) -> RequestRecord:
    rec = RequestRecord(request_id=f"r{i}", route="/v1/chat/completions", api="openai",
                        t_received_ns=i * S, t_end_ns=i * S + int(seconds * S), outcome="ok")
    rec.energy = EnergyAttribution(full_joules=joules, source="replay")
    for k, v in kw.items():
        setattr(rec, k, v)
    return rec


def test_cold_start_energy_is_the_window_and_the_tax_uses_warm_requests() -> None:
    sampler, reader = run_trace(H200)
    (uuid,) = reader.gpu_uuids
    ts, js = counter_curve(H200, uuid)
    registry = CollectorRegistry()
    rec = ColdStartRecorder(ColdStartMetrics(registry), energy=sampler, idle_watts_configured=100.0)
    for i, (j, s) in enumerate([(2.0, 0.5), (4.0, 1.0), (9.0, 2.0)]):
        assert rec.recent.add(warm(i, j, s))
    assert not rec.recent.add(warm(9, 50.0, 9.0, cold_start=True))      # held: not a warm request
    assert not rec.recent.add(warm(9, 50.0, 9.0, outcome="error"))

    tl = ColdStartTimeline(hold_start=10 * S)
    tl.set("ready", 40 * S)
    tl.set("first_token", 41 * S)
    cs = ColdStart(id=1, reason="request", timeline=tl, outcome="ready", load_energy_joules=1.0)
    asyncio.run(rec.finalize(cs))

    want = interp(ts, js, 41 * S) - interp(ts, js, 10 * S)
    assert cs.energy is not None and cs.energy.joules == pytest.approx(want, rel=1e-6)
    assert cs.energy.kind == "replayed" and cs.energy.gap is False
    assert cs.tax_joules == (cs.energy.joules, "replay")
    # C_tax's one definition: mean cold start over mean warm request (not the median, 4 J / 1 s)
    assert cs.mean_request_joules == pytest.approx(5.0) and cs.mean_request_seconds == pytest.approx(3.5 / 3)
    assert cs.tax_energy_ratio == pytest.approx(want / 5.0, rel=1e-6)
    assert cs.tax_time_ratio == pytest.approx(31.0 / (3.5 / 3))
    assert cs.break_even_idle_seconds == pytest.approx(want / 100.0, rel=1e-6)
    assert list(rec.history) == [cs] and cs.finalized
    assert registry.get_sample_value("edge_proxy_keep_warm_break_even_idle_seconds") == \
        pytest.approx(want / 100.0, rel=1e-6)
    d = cs.to_dict()
    assert d["energy_joules"] == cs.energy.joules and d["energy_source"] == "replay" and d["energy_kind"] == "replayed"


def test_a_window_the_ticks_do_not_cover_falls_back_to_the_load_energy() -> None:
    sampler, _ = run_trace(H200)
    end = sampler.ticks[-1].t1_ns
    rec = ColdStartRecorder(ColdStartMetrics(CollectorRegistry()), energy=lambda: sampler)
    tl = ColdStartTimeline(hold_start=end - 10 * S)      # 10 s in the trace, 30 s after it ends
    tl.set("ready", end + 30 * S)
    cs = ColdStart(id=2, reason="restart", timeline=tl, outcome="ready", load_energy_joules=123.0)
    asyncio.run(rec.finalize(cs))
    assert cs.energy is None and cs.energy_source == "none"
    assert cs.tax_joules == (123.0, "model_server_load")


def test_the_window_waits_for_ticks_that_close_late() -> None:
    """On a loaded host the sampler closes the ticks of a cold start's last seconds late: the recorder waits
    for a tick that reaches the window's end (within TICK_WAIT_S) instead of measuring a window it covers
    only partly (before: under the coverage floor, no measured energy, a missing histogram sample)."""
    reader = ReplayReader(H200, mode="driven", loop=False, origin_ns=0)
    sampler = Sampler(reader, reader.period_seconds)
    while not reader.exhausted and (not sampler.ticks or sampler.ticks[-1].t1_ns < 18 * S):
        sampler.step()                                # the ticks up to ~18 s exist when the cold start ends
    ts, js = counter_curve(H200, reader.gpu_uuids[0])
    registry = CollectorRegistry()
    rec = ColdStartRecorder(ColdStartMetrics(registry), energy=sampler)
    tl = ColdStartTimeline(hold_start=10 * S)
    tl.set("ready", 40 * S)
    tl.set("first_token", 41 * S)
    cs = ColdStart(id=3, reason="request", timeline=tl, outcome="ready")

    async def late_ticks() -> None:
        await asyncio.sleep(0.4)                      # longer than the two periods the recorder waited before
        while not reader.exhausted:
            sampler.step()

    async def main() -> None:
        await asyncio.gather(rec.finalize(cs), late_ticks())

    asyncio.run(main())
    want = interp(ts, js, 41 * S) - interp(ts, js, 10 * S)
    assert cs.energy is not None and cs.energy.joules == pytest.approx(want, rel=1e-6)
    assert registry.get_sample_value("edge_proxy_cold_start_energy_joules_count",
                                     {"phase": "total", "source": "replay"}) == 1
