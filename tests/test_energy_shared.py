"""Several proxies on one GPU counter (``--energy-shared``): the activity table, the shared reader's
split, and the ledger's idle baseline scaled by the share. Real processes: tests/test_energy_shared_e2e.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge_proxy.energy.ledger_idle import IdlePower
from edge_proxy.energy.readings import Tick, merge_ticks
from edge_proxy.energy.replay_source import ReplayReader
from edge_proxy.energy.sampler import Sampler
from edge_proxy.energy.shared_source import SharedReader
from edge_proxy.energy.shared_table import HEADER, SLOT, ActivityTable, TableError, shares

TRACE = Path(__file__).parent / "data" / "energy_h200_recorded.jsonl"
MS = 1_000_000


def test_shares_split_by_request_time_and_evenly_when_nothing_ran() -> None:
    assert shares({1: 0, 2: 0}, {1: 300, 2: 100}, 2) == {1: 0.75, 2: 0.25}
    assert shares({1: 5, 2: 7}, {1: 5, 2: 7}, 2) == {1: 0.5, 2: 0.5}        # all idle: even
    # a slot that appeared in between takes nothing yet; the others keep the whole
    assert shares({1: 0}, {1: 10, 3: 50}, 2) == {1: 1.0}


def test_two_tables_on_one_file_take_two_slots_and_integrate_requests_in_flight(tmp_path: Path) -> None:
    path = str(tmp_path / "act")
    a, b = ActivityTable(path), ActivityTable(path)
    try:
        assert (a.slot, b.slot) == (0, 1) and a.created_ns == b.created_ns
        t0 = a._t_last + 1000 * MS
        snap0, live = a.snapshot(t0)      # the table knows only the present: read it first
        a.begin(t0)
        a.begin(t0)                       # two of A's requests from t0
        b.begin(t0 + 100 * MS)            # one of B's from t0 + 100 ms
        a.end(t0 + 200 * MS)
        snap1, _ = b.snapshot(t0 + 300 * MS)
        assert live == 2
        s = shares(snap0, snap1, live)
        # A: 2 x 200 ms + 1 x 100 ms = 500 request-ms; B: 200 request-ms
        assert s[a.key] == pytest.approx(500 / 700)
        assert s[b.key] == pytest.approx(200 / 700)
    finally:
        a.close()
        b.close()
    c = ActivityTable(path)               # both slots were given back
    assert c.slot == 0
    c.close()


def test_a_dead_processes_slot_is_skipped_and_reused(tmp_path: Path) -> None:
    path = str(tmp_path / "act")
    a = ActivityTable(path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(dead.stdout)
    SLOT.pack_into(a._map, HEADER.size + 1 * SLOT.size, 2, pid, 7, 3, 0, 10**12)   # a crashed owner's slot
    snap, live = a.snapshot(a._t_last)
    assert live == 1 and list(snap) == [a.key]
    b = ActivityTable(path)
    assert b.slot == 1
    a.close()
    b.close()


def test_a_file_that_is_not_a_table_is_a_one_line_error(tmp_path: Path) -> None:
    p = tmp_path / "junk"
    p.write_bytes(b"x" * 100)
    with pytest.raises(TableError, match="not an edge-proxy energy table"):
        ActivityTable(str(p))
    with pytest.raises(TableError, match="cannot open"):
        ActivityTable(str(tmp_path / "no" / "such" / "dir"))


def test_two_shared_readers_hand_out_the_counter_once(tmp_path: Path) -> None:
    """Two proxies replaying the same counter: A busy alone, then both (A twice B's requests), then
    nobody. Their virtual counters add up to the real one; each gets its share."""
    path = str(tmp_path / "act")
    ta, tb = ActivityTable(path), ActivityTable(path)
    origin = ta._t_last + 10 * MS
    ra = SharedReader(ReplayReader(TRACE, mode="driven", loop=False, origin_ns=origin), ta)
    rb = SharedReader(ReplayReader(TRACE, mode="driven", loop=False, origin_ns=origin), tb)
    sa, sb = Sampler(ra, 0.1), Sampler(rb, 0.1)
    real = Sampler(ReplayReader(TRACE, mode="driven", loop=False, origin_ns=origin), 0.1)
    ticks_a: list[Tick] = []
    sa.add_listener(ticks_a.append)
    # the table knows only the present: requests begin as the trace's time reaches them
    events = [(2_000, ta.begin), (20_000, tb.begin), (20_000, ta.begin), (40_000, ta.end), (40_000, ta.end),
              (40_000, tb.end)]
    for _ in range(450):                                # 45 s of the trace
        sa.step(), sb.step(), real.step()
        now = real.readings[-1].t_ns
        while events and origin + events[0][0] * MS <= now:
            events.pop(0)[1](now)
    e_a, e_b = sum(sa.energy_joules_by_gpu.values()), sum(sb.energy_joules_by_gpu.values())
    e_real = sum(real.energy_joules_by_gpu.values())
    assert e_a + e_b == pytest.approx(e_real, rel=1e-4)      # each joule once (int mJ rounding)
    assert e_a > 2 * e_b > 0
    # before 2 s nothing ran: even split; 2-20 s: all A's; after 20 s: A 2/3
    early = [t for t in ticks_a if t.t1_ns <= origin + 2_000 * MS]
    mid = [t for t in ticks_a if origin + 3_000 * MS <= t.t0_ns and t.t1_ns <= origin + 19_000 * MS]
    late = [t for t in ticks_a if origin + 21_000 * MS <= t.t0_ns and t.t1_ns <= origin + 39_000 * MS]
    assert early and mid and late
    assert all(t.share == pytest.approx(0.5) for t in early)
    assert all(t.share == pytest.approx(1.0) for t in mid)
    assert all(t.share == pytest.approx(2 / 3) for t in late)
    ta.close()
    tb.close()


def test_idle_power_is_learned_from_the_share_and_merged_ticks_keep_it() -> None:
    idle = IdlePower(None)
    idle.learn(Tick(0, 100 * MS, 5.0, {"g": 5.0}, share=0.5), nothing_in_flight=True)   # 50 W x 0.1 s x 0.5
    assert idle.watts == pytest.approx(100.0)
    idle2 = IdlePower(None)
    idle2.learn(Tick(0, 100 * MS, 0.001, {"g": 0.001}, share=0.01), nothing_in_flight=True)
    assert idle2.source == "default"                    # too small a share teaches nothing
    m = merge_ticks(Tick(0, 100 * MS, 1.0, {}, share=1.0), Tick(100 * MS, 400 * MS, 1.0, {}, share=0.0))
    assert m.share == pytest.approx(0.25) and m.idle_seconds == pytest.approx(0.1)


def test_proxies_sharing_a_table_name_a_local_backend_by_the_host() -> None:
    """Weights are counted once per backend by the recording rules; N proxies on one host in front
    of 127.0.0.1 would otherwise count them N times (ρ_sys N times too low)."""
    from edge_proxy.economics.stats import weights_backend_label

    assert weights_backend_label("http://127.0.0.1:8000", "/dev/shm/t", "node-7") == "http://node-7:8000"
    assert weights_backend_label("http://localhost:8000/", "/dev/shm/t", "node-7") == "http://node-7:8000/"
    assert weights_backend_label("http://127.0.0.1:8000", None, "node-7") == "http://127.0.0.1:8000"
    assert weights_backend_label("http://gpu-a:8000", "/dev/shm/t", "node-7") == "http://gpu-a:8000"
