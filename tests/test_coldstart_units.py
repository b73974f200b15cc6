"""Pure parts of the cold-start component: clock conversion, phase segments, energy over a
window, command splitting, restart backoff."""
from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_proxy.coldstart.clock import ClockPair, epoch_to_monotonic_ns, monotonic_to_epoch_ns
from edge_proxy.coldstart.phases import ColdStartTimeline, milestones_in_order, segment_seconds
from edge_proxy.coldstart.spawn import SpawnError, backoff_seconds, build_argv
from edge_proxy.energy.readings import Tick
from edge_proxy.energy.window import measure_ticks


def test_epoch_to_monotonic_matches_the_clocks() -> None:
    pair = ClockPair.now()
    # An epoch timestamp taken now maps to (about) the monotonic time now.
    m_before = time.monotonic_ns()
    epoch_now = time.time()
    m_after = time.monotonic_ns()
    got = epoch_to_monotonic_ns(epoch_now, pair)
    assert m_before - 2_000_000 <= got <= m_after + 2_000_000   # float epoch ~0.24 µs; clocks may slew


@given(st.integers(min_value=-10**12, max_value=10**12))
def test_epoch_monotonic_round_trip(offset_ns: int) -> None:
    pair = ClockPair(wall_ns=1_795_000_000_000_000_000, mono_ns=5_000_000_000_000)
    mono = pair.mono_ns + offset_ns
    epoch_ns = monotonic_to_epoch_ns(mono, pair)
    back = epoch_to_monotonic_ns(epoch_ns / 1e9, pair)
    assert abs(back - mono) <= 1_000      # float epoch seconds keep sub-microsecond precision


def test_segments_and_order() -> None:
    s = 1_000_000_000
    tl = ColdStartTimeline(hold_start=10 * s)
    for name, t in (("process_start", 10 * s + s // 100), ("listening", 12 * s), ("load_start", 12 * s),
                    ("load_end", 15 * s), ("ready", 16 * s), ("first_token", 16 * s + s // 2)):
        tl.set(name, t)
    seg = segment_seconds(tl)
    assert seg["spawn"] == pytest.approx(0.01)
    assert seg["load"] == pytest.approx(3.0)
    assert seg["warmup"] == pytest.approx(1.0)
    assert seg["first_token"] == pytest.approx(0.5)
    assert seg["total"] == pytest.approx(6.5)
    assert seg["to_ready"] == pytest.approx(6.0)
    # the parts add up to the whole
    parts = sum(seg[k] for k in ("spawn", "listen", "init", "load", "warmup", "first_token"))
    assert parts == pytest.approx(seg["total"])
    assert milestones_in_order(tl)


def test_missing_and_negative_segments() -> None:
    tl = ColdStartTimeline(hold_start=5_000_000_000)
    tl.set("process_start", 4_000_000_000, "backend")     # backend started before the hold
    tl.set("ready", 6_000_000_000)
    seg = segment_seconds(tl)
    assert seg["spawn"] == 0.0                            # clamped, the raw milestone is kept
    assert tl.offsets_seconds()["process_start"] == pytest.approx(-1.0)
    assert "load" not in seg and "total" not in seg
    assert not milestones_in_order(tl)
    tl.set("ready", 7_000_000_000)                        # set() keeps the first value
    assert tl.ready == 6_000_000_000
    with pytest.raises(ValueError):
        tl.set("nope", 1)


def test_overlap_joules_prorates_edges() -> None:
    ticks = [Tick(0, 100, 10.0, {}), Tick(100, 200, 20.0, {}), Tick(200, 300, 30.0, {})]
    m = measure_ticks(ticks, 50, 250, source="nvml")
    assert m.joules == pytest.approx(5.0 + 20.0 + 15.0)
    assert m.coverage == pytest.approx(1.0)
    m = measure_ticks(ticks, 250, 450, source="nvml")
    assert m.joules == pytest.approx(15.0) and m.coverage == pytest.approx(0.25)
    m = measure_ticks(ticks, 300, 300, source="nvml")
    assert (m.joules, m.coverage) == (0.0, 0.0)


def test_build_argv_placeholders_and_errors() -> None:
    argv = build_argv("model-server serve '/m dir' --port {port} --host {host}", "127.0.0.1", 8123)
    assert argv == ["model-server", "serve", "/m dir", "--port", "8123", "--host", "127.0.0.1"]
    with pytest.raises(SpawnError):
        build_argv("   ", "h", 1)
    with pytest.raises(SpawnError):
        build_argv("a 'b", "h", 1)


def test_backoff_doubles_and_caps() -> None:
    assert backoff_seconds(0) == 0.0
    assert [backoff_seconds(n, 1.0, 10.0) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 10.0]
