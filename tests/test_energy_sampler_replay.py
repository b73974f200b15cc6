"""The energy sampler over replayed counter traces: resets clamped, failed reads and gaps recorded once, energy
conserved through the ledger, bad traces one line, gzipped traces, the real-time replay thread, unchanged counter
reads, and (hypothesis) any counter sequence with resets and failed reads."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from hypothesis import example, given, settings as hsettings, strategies as st

from edge_proxy.energy.ledger import Ledger
from edge_proxy.energy.readings import ReaderError
from edge_proxy.energy.replay_source import ReplayReader, load_trace
from edge_proxy.energy.sampler import Sampler

TRACE = Path(__file__).parent / "data" / "energy_h100_synthetic.jsonl"


def expected_from_trace(path: Path) -> tuple[dict[str, float], int, int]:
    """Independent reading of a trace: per-GPU joules (sum of non-negative deltas between
    successive good readings), the number of counter drops, the number of failed reads."""
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    good = [x for x in lines if "energy_millijoules" in x]
    errors = sum(1 for x in lines if "error" in x)
    joules: dict[str, float] = {}
    drops = 0
    for a, b in zip(good, good[1:]):
        for u, v in b["energy_millijoules"].items():
            d = v - a["energy_millijoules"][u]
            if d < 0:
                drops += 1
                d = 0
            joules[u] = joules.get(u, 0.0) + d / 1000.0
    return joules, drops, errors


def gaps_in_trace(path: Path) -> int:
    """Independent count of the gap ticks a trace must produce: every good read after the first
    that follows a failed read or sees any counter go down closes one gap tick (the trace has no
    unchanged-counter reads, which close no tick)."""
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    gaps, pending, prev = 0, False, None
    for x in lines:
        if "error" in x:
            pending = True
            continue
        if "energy_millijoules" not in x:
            continue
        if prev is not None:
            assert x["energy_millijoules"] != prev["energy_millijoules"]
            drop = any(v < prev["energy_millijoules"][u] for u, v in x["energy_millijoules"].items())
            gaps += pending or drop
            pending = False
        prev = x
    return gaps


def test_driven_replay_clamps_resets_and_records_gaps(caplog):
    expected, drops, errors = expected_from_trace(TRACE)
    assert drops >= 1 and errors >= 1        # the trace really holds the defects under test
    reader = ReplayReader(TRACE, mode="driven", loop=False, origin_ns=0)
    sampler = Sampler(reader, 0.1)
    ledger = Ledger(idle_watts=None)
    sampler.add_listener(ledger.add_tick)
    with caplog.at_level(logging.WARNING, logger="edge_proxy.energy.sampler"):
        while not reader.exhausted:
            sampler.step()
    snap = sampler.snapshot()
    for u, j in expected.items():
        assert snap["energy_joules_by_gpu"][u] == pytest.approx(j, rel=1e-12)
    assert sampler.resets_total == drops and sampler.errors_total == errors
    gaps = gaps_in_trace(TRACE)
    assert gaps >= 2                          # a reset and a failed read, on different ticks
    assert sampler.gaps_total == gaps == sum(t.gap for t in sampler.ticks)
    ticks = list(sampler.ticks)
    assert all(a.t1_ns == b.t0_ns for a, b in zip(ticks, ticks[1:]))          # contiguous
    assert max(t.dt_seconds for t in ticks) > 1.0                              # the 1.2 s gap is one tick
    assert all(t.joules >= 0 for t in ticks)
    # the failed read is logged once (it occurs once; a second identical failure would not log again)
    assert sum("read failed" in r.getMessage() for r in caplog.records) == 1
    assert sum("went down" in r.getMessage() for r in caplog.records) == drops
    ledger.flush()
    tot = ledger.snapshot()
    assert tot.measured_joules == pytest.approx(sum(expected.values()), rel=1e-12)
    assert tot.idle_joules == pytest.approx(tot.measured_joules)              # nothing was in flight
    assert ledger.idle_watts > 0


def test_repeated_failures_log_once(caplog):
    reader = ReplayReader(TRACE, mode="driven", loop=True, origin_ns=0)
    sampler = Sampler(reader, 0.1)
    with caplog.at_level(logging.WARNING, logger="edge_proxy.energy.sampler"):
        for _ in range(3 * len(reader.records)):      # three passes: three failed reads, three resets
            sampler.step()
    assert sampler.errors_total >= 3
    assert sum("read failed" in r.getMessage() for r in caplog.records) == 1


def test_replay_with_requests_conserves_energy():
    reader = ReplayReader(TRACE, mode="driven", loop=False, origin_ns=0)
    sampler = Sampler(reader, 0.1)
    ledger = Ledger(idle_watts=None, max_defer_seconds=5.0)
    sampler.add_listener(ledger.add_tick)
    n = 0
    while not reader.exhausted:
        ticks = sampler.step()
        for t in ticks:                                  # a request every tick, 3 ticks long, 2 tokens/tick
            rid = f"r{n}"
            n += 1
            ledger.start(rid, t.t1_ns - 5_000_000, "m", stream=n % 3 != 0)
            for k in range(3):
                ledger.tokens(rid, 2, t.t1_ns + k * 100_000_000)
            ledger.end(rid, t.t1_ns + 250_000_000, prompt_tokens=20, output_tokens=6, now_ns=t.t1_ns)
    ledger.flush()
    tot = ledger.snapshot()
    assert tot.measured_joules > 0 and tot.active_joules > 0
    assert tot.active_joules + tot.idle_joules == pytest.approx(tot.measured_joules, rel=1e-9)


def test_bad_traces_fail_with_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"t": 0, "energy_millijoules": {"g": 1}}\n{"t": 0.1, "energy_millijoules": "x"}\n')
    with pytest.raises(ReaderError, match="line 2"):
        load_trace(bad)
    with pytest.raises(ReaderError, match="cannot read"):
        load_trace(tmp_path / "missing.jsonl")
    back = tmp_path / "back.jsonl"
    back.write_text('{"t": 1, "energy_millijoules": {"g": 1}}\n{"t": 0.5, "energy_millijoules": {"g": 2}}\n')
    with pytest.raises(ReaderError, match="backwards"):
        load_trace(back)


def test_gzipped_traces_replay_as_the_plain_file(tmp_path):
    """The traces under benchmarks/results/ are committed compressed: a .gz path reads as its content."""
    import gzip

    text = '{"kind": "header", "source": "nvml"}\n{"t": 0, "energy_millijoules": {"g": 1}}\n' \
           '{"t": 0.1, "energy_millijoules": {"g": 9}, "power_watts": {"g": 80.0}}\n'
    plain, packed = tmp_path / "t.jsonl", tmp_path / "t.jsonl.gz"
    plain.write_text(text)
    packed.write_bytes(gzip.compress(text.encode()))
    assert load_trace(packed) == load_trace(plain)
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(ReaderError, match="cannot read"):
        load_trace(tmp_path / "bad.jsonl.gz")


def test_realtime_replay_thread_produces_ticks():
    reader = ReplayReader(TRACE, mode="realtime", loop=True)
    sampler = Sampler(reader, 0.05)
    sampler.start()
    try:
        deadline = time.monotonic() + 10
        while len(sampler.ticks) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sampler.stop()
    assert len(sampler.ticks) >= 3
    assert not sampler.running


@hsettings(max_examples=60, deadline=None)
@example(steps=[(1, 0, "ok"), (1, 0, "error"), (1, 0, "ok")])      # ends on stale reads (found in CI, 2026-12-05)
@given(steps=st.lists(st.tuples(st.integers(1, 300), st.integers(0, 90_000),
                                st.sampled_from(["ok", "ok", "ok", "ok", "reset", "error", "gap"])),
                      min_size=2, max_size=60))
def test_sampler_totals_match_the_trace_for_any_resets_and_gaps(steps, tmp_path_factory):
    """Per GPU: measured = sum of the non-negative deltas between successive good reads; ticks are
    contiguous, never negative, and every reset or failed read leaves a gap mark."""
    path = tmp_path_factory.mktemp("trace") / "t.jsonl"
    t, counter, lines = 0.0, 5_000_000, []
    for dt_ms, inc, kind in steps:
        t += dt_ms / 1000.0 * (10 if kind == "gap" else 1)
        counter += inc
        if kind == "reset":
            counter = inc // 7
        if kind == "error":
            lines.append({"t": round(t, 6), "error": "NVMLError_Unknown"})
        else:
            lines.append({"t": round(t, 6), "energy_millijoules": {"GPU-p": counter}})
    if sum(1 for x in lines if "error" not in x) < 2:
        lines.append({"t": round(t + 0.1, 6), "energy_millijoules": {"GPU-p": counter}})
        lines.append({"t": round(t + 0.2, 6), "energy_millijoules": {"GPU-p": counter + 1}})
    # a last read with news: the gap a failed read leaves is marked on the next tick, and reads of an unchanged
    # counter close none (Sampler._stale), so a trace that ended on those would have no tick to mark
    lines.append({"t": round(t + 0.3, 6), "energy_millijoules": {"GPU-p": counter + 2}})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    expected, drops, errors = expected_from_trace(path)
    reader = ReplayReader(path, mode="driven", loop=False, origin_ns=0)
    sampler = Sampler(reader, 0.1)
    ledger = Ledger(idle_watts=None)
    sampler.add_listener(ledger.add_tick)
    while not reader.exhausted:
        sampler.step()
    ticks = list(sampler.ticks)
    assert sampler.snapshot()["energy_joules_by_gpu"]["GPU-p"] == pytest.approx(expected.get("GPU-p", 0.0))
    assert all(a.t1_ns == b.t0_ns for a, b in zip(ticks, ticks[1:]))
    assert all(tk.joules >= 0 for tk in ticks)
    assert sampler.resets_total == drops and sampler.errors_total == errors
    good = [i for i, x in enumerate(lines) if "error" not in x]
    inner_errors = sum(1 for i, x in enumerate(lines) if "error" in x and good[0] < i < good[-1])
    assert sum(1 for tk in ticks if tk.gap) >= min(1, drops + inner_errors)
    ledger.flush()
    assert ledger.snapshot().measured_joules == pytest.approx(sum(expected.values()))


def test_unchanged_counter_reads_close_no_tick(tmp_path):
    """A read that lands before the counter's next update sees the same value: no 0 J tick; the next
    update closes one tick over the whole time. A counter that stops still closes ticks eventually."""
    lines = [(0.0, 1000), (0.1, 9000), (0.2, 9000), (0.3, 25000), (0.4, 33000)]
    lines += [(0.4 + 0.1 * k, 33000) for k in range(1, 9)]          # stopped counter for 0.8 s
    path = tmp_path / "stale.jsonl"
    path.write_text("".join(json.dumps({"t": t, "energy_millijoules": {"g": v}}) + "\n" for t, v in lines))
    reader = ReplayReader(path, mode="driven", loop=False, origin_ns=0)
    sampler = Sampler(reader, 0.1)
    while not reader.exhausted:
        sampler.step()
    ticks = list(sampler.ticks)
    assert [(round(t.t0_ns / 1e9, 3), round(t.t1_ns / 1e9, 3), t.joules) for t in ticks[:3]] == [
        (0.0, 0.1, 8.0), (0.1, 0.3, 16.0), (0.3, 0.4, 8.0)]
    assert len(ticks) == 4 and ticks[3].joules == 0.0 and ticks[3].t1_ns - ticks[3].t0_ns == 500_000_000
