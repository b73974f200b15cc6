"""Measurement windows (edge_proxy.energy.window) over the sampler fed by recorded traces: the REAL
H200 NVML trace (tests/data/energy_h200_recorded.jsonl) and the generated H100 trace with a counter
reset and a failed read. Expected energies are computed from the trace files independently (the
counter interpolated between the readings where it changed), never from the sampler's ticks."""
from __future__ import annotations

import bisect
import json
import random
from pathlib import Path

import pytest

from edge_proxy.energy.readings import Tick
from edge_proxy.energy.replay_source import ReplayReader
from edge_proxy.energy.sampler import Sampler
from edge_proxy.energy.window import EnergyWindows, Measurement, measure_ticks, source_kind

DATA = Path(__file__).parent / "data"
H200 = DATA / "energy_h200_recorded.jsonl"
H100 = DATA / "energy_h100_synthetic.jsonl"


def run_trace(path: Path) -> tuple[Sampler, ReplayReader]:
    """Drive the whole trace through a sampler on a virtual clock (stamp = t - t_first)."""
    reader = ReplayReader(path, mode="driven", loop=False, origin_ns=0)
    sampler = Sampler(reader, reader.period_seconds)
    while not reader.exhausted:
        sampler.step()
    return sampler, reader


def counter_curve(path: Path, uuid: str) -> tuple[list[int], list[float]]:
    """(t_ns, cumulative joules) at the readings where ``uuid``'s counter changed, from the file."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "energy_millijoules" in r]
    t_first = rows[0]["t"]
    ts: list[int] = []
    js: list[float] = []
    last = None
    for r in rows:
        v = r["energy_millijoules"][uuid]
        if v != last:
            ts.append(int(round((r["t"] - t_first) * 1e9)))
            js.append(v / 1000.0)
            last = v
    return ts, js


def interp(ts: list[int], js: list[float], t: int) -> float:
    i = bisect.bisect_right(ts, t)
    if i == 0:
        return js[0]
    if i == len(ts):
        return js[-1]
    t0, t1 = ts[i - 1], ts[i]
    return js[i - 1] + (js[i] - js[i - 1]) * (t - t0) / (t1 - t0)


def test_source_kinds() -> None:
    assert [source_kind(s) for s in ("nvml", "remote", "replay", "estimated", "other", "none")] == \
        ["measured", "measured", "replayed", "estimated", "estimated", "none"]


def test_whole_h200_trace_window_equals_the_counter_delta() -> None:
    sampler, reader = run_trace(H200)
    (uuid,) = reader.gpu_uuids
    ts, js = counter_curve(H200, uuid)
    win = EnergyWindows(sampler)
    m = win.measure(ts[0], ts[-1], name="all")
    assert isinstance(m, Measurement) and m.name == "all"
    assert m.joules == pytest.approx(js[-1] - js[0], rel=1e-9)
    assert m.joules_by_device == {uuid: pytest.approx(js[-1] - js[0], rel=1e-9)}
    assert m.seconds == pytest.approx((ts[-1] - ts[0]) / 1e9)
    assert m.source == "replay" and m.kind == "replayed"
    assert m.gap is False and m.coverage == pytest.approx(1.0) and m.complete
    assert m.to_dict()["joules"] == m.joules


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_h200_windows_prorate_the_edge_ticks(seed: int) -> None:
    sampler, reader = run_trace(H200)
    (uuid,) = reader.gpu_uuids
    ts, js = counter_curve(H200, uuid)
    win = EnergyWindows(sampler)
    rnd = random.Random(seed)
    for _ in range(50):
        a = rnd.randrange(ts[0], ts[-1] - 1)
        b = rnd.randrange(a + 1, min(ts[-1], a + 3_000_000_000) + 1)
        m = win.measure(a, b)
        assert m.joules == pytest.approx(interp(ts, js, b) - interp(ts, js, a), rel=1e-6, abs=1e-6)
        assert m.coverage == pytest.approx(1.0) and not m.gap
    # consecutive windows add up to the window over their union
    cuts = sorted(rnd.sample(range(ts[0] + 1, ts[-1]), 20))
    bounds = [ts[0], *cuts, ts[-1]]
    parts = [win.measure(x, y).joules for x, y in zip(bounds, bounds[1:])]
    assert sum(parts) == pytest.approx(win.measure(ts[0], ts[-1]).joules, rel=1e-9)


def test_begin_end_window_on_the_sampler_clock() -> None:
    reader = ReplayReader(H200, mode="driven", loop=False, origin_ns=0)
    sampler = Sampler(reader, reader.period_seconds)
    now = {"t": 0}
    win = EnergyWindows(sampler, clock=lambda: now["t"])
    (uuid,) = reader.gpu_uuids
    ts, js = counter_curve(H200, uuid)

    def advance_to(t_ns: int) -> None:
        while not reader.exhausted and now["t"] < t_ns:
            for tick in sampler.step():
                now["t"] = tick.t1_ns

    advance_to(1_000_000_000)
    start = win.begin_window("burst")
    assert win.open_windows == ("burst",)
    with pytest.raises(ValueError):
        win.begin_window("burst")
    advance_to(20_000_000_000)
    m = win.end_window("burst")
    assert m is not None and win.open_windows == ()
    assert m.start_ns == start and m.end_ns == now["t"]
    assert m.joules == pytest.approx(interp(ts, js, m.end_ns) - interp(ts, js, start), rel=1e-9)
    with pytest.raises(ValueError):
        win.end_window("burst")
    win.begin_window("dropped")
    assert win.end_window("dropped", cancel=True) is None and win.open_windows == ()
    # a window that ends past the last closed tick is only partly covered, and says so
    win.begin_window("ahead", now["t"] - 500_000_000)
    late = win.end_window("ahead", now["t"] + 500_000_000)
    assert late is not None and late.coverage == pytest.approx(0.5, abs=0.01) and not late.complete
    assert late.joules_if_covered(0.4) == late.joules and late.joules_if_covered(0.6) is None


def test_reset_and_failed_read_mark_the_window_as_gapped() -> None:
    sampler, reader = run_trace(H100)
    rows = [json.loads(x) for x in H100.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "t" in r]
    t_first = rows[0]["t"]
    ns = lambda t: int(round((t - t_first) * 1e9))   # noqa: E731
    win = EnergyWindows(sampler)
    clean = win.measure(ns(1001.0), ns(1009.0))
    assert not clean.gap and clean.complete
    assert set(clean.joules_by_device) == set(reader.gpu_uuids)
    assert sum(clean.joules_by_device.values()) == pytest.approx(clean.joules, rel=1e-9)
    for uuid in reader.gpu_uuids:        # per device, against that device's own counter
        ts, js = counter_curve(H100, uuid)
        want = interp(ts, js, ns(1009.0)) - interp(ts, js, ns(1001.0))
        assert clean.joules_by_device[uuid] == pytest.approx(want, rel=1e-6)
    reset = win.measure(ns(1009.0), ns(1011.0))          # GPU 2's counter restarts at ~1010.08
    assert reset.gap and not reset.complete
    failed = win.measure(ns(1014.5), ns(1015.5))         # the failed read at ~1015.08
    assert failed.gap
    assert not win.measure(ns(1016.0), ns(1019.0)).gap


def test_measure_ticks_edges() -> None:
    ticks = [Tick(0, 100, 10.0, {"g": 10.0}), Tick(100, 200, 20.0, {"g": 20.0}),
             Tick(200, 300, 30.0, {"g": 30.0}, gap=True)]
    m = measure_ticks(ticks, 50, 150, source="nvml")
    assert m.joules == pytest.approx(15.0) and m.joules_by_device == {"g": pytest.approx(15.0)}
    assert m.kind == "measured" and m.coverage == pytest.approx(1.0) and not m.gap
    m = measure_ticks(ticks, 250, 450, source="estimated")
    assert m.joules == pytest.approx(15.0) and m.coverage == pytest.approx(0.25) and m.gap
    empty = measure_ticks(ticks, 300, 300, source="nvml")
    assert empty.joules == 0.0 and empty.coverage == 0.0 and empty.seconds == 0.0
