"""The energy sampler's per-tick and per-token savings (issue 17) change no result: the process tree
listed again reuses what it knew and lists what psutil lists; the energy observer, called for a
stream's first token event only, gives the ledger the same joules; the split's inlined weight of a
stream is apportion's."""
from __future__ import annotations

import os
import random
import subprocess
import sys

import psutil
import pytest
from prometheus_client import CollectorRegistry

from edge_proxy.energy.apportion import TOKEN_WEIGHTED, Deferred, ReqView, request_weight
from edge_proxy.energy.ledger import Ledger
from edge_proxy.energy.observer import EnergyObserver
from edge_proxy.energy.process_cpu import ProcessTreeCpu
from edge_proxy.energy.readings import Tick
from edge_proxy.energy.tick_split import stream_weight
from edge_proxy.proxy.bookkeeping import Bookkeeping
from edge_proxy.proxy.hooks import BaseObserver, RequestRecord
from edge_proxy.telemetry.metrics import ProxyMetrics

MS = 1_000_000

ROOT_SCRIPT = r"""
import subprocess, sys
kids = []
for line in sys.stdin:
    if line.startswith("spawn"):
        kids.append(subprocess.Popen(["sleep", "60"]))
    elif line.startswith("kill"):
        k = kids.pop(0); k.kill(); k.wait()
    print("ok", flush=True)
"""


def _pidfds() -> int:
    """Pidfds this process holds."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]"
        except OSError:
            continue
    return n


def _say(p: subprocess.Popen[str], what: str) -> None:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(what + "\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "ok"


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"), reason="/proc, pidfds")
def test_tree_listed_again_reuses_live_processes_and_matches_psutil() -> None:
    top = subprocess.Popen([sys.executable, "-c", ROOT_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True)
    base = _pidfds()
    tree = ProcessTreeCpu(lambda: top.pid, refresh_seconds=0.0)      # listed again on every read
    try:
        _say(top, "spawn")
        _say(top, "spawn")

        def listed() -> list[int]:
            root = psutil.Process(top.pid)
            return [top.pid, *(p.pid for p in root.children(recursive=True))]
        tree.busy_seconds()
        assert [p.pid for p in tree._procs] == listed()
        objs, fds = list(tree._procs), list(tree._fds)
        assert _pidfds() - base == 3
        tree.busy_seconds()                          # nothing changed: the very same objects and pidfds
        assert tree._procs == objs and all(a is b for a, b in zip(tree._procs, objs)) and tree._fds == fds
        _say(top, "spawn")                           # a new child is found; the others stay as they were
        tree.busy_seconds()
        assert [p.pid for p in tree._procs] == listed() and len(tree._procs) == 4
        assert all(a is b for a, b in zip(tree._procs, objs)) and tree._fds[:3] == fds
        _say(top, "kill")                            # an exited child leaves, its pidfd is closed
        tree.busy_seconds()
        assert [p.pid for p in tree._procs] == listed() and len(tree._procs) == 3
        assert _pidfds() - base == 3
        assert tree._procs[0] is objs[0] and tree._procs[1] is objs[2]
    finally:
        tree.close()
        for p in psutil.Process(top.pid).children(recursive=True):
            p.kill()
        assert top.stdin is not None
        top.stdin.close()
        top.wait(10)
    assert _pidfds() == base


# ---- a stream's token events: the energy observer hears of the first one only -------------------------
class _Count(BaseObserver):
    def __init__(self, first_only: bool) -> None:
        self.first_token_only = first_only
        self.calls: list[tuple[int, int]] = []

    def on_tokens(self, rec: RequestRecord, n: int, t_ns: int) -> None:
        self.calls.append((n, t_ns))


def test_first_token_only_observers_hear_of_the_first_event_only() -> None:
    first, every = _Count(True), _Count(False)
    book = Bookkeeping(ProxyMetrics(CollectorRegistry()), [first, every], [])
    rec = RequestRecord(request_id="a", route="/v1/chat/completions", api="openai", stream=True)
    for i, n in enumerate([2, 1, 1, 3]):
        book.tokens(rec, n, 100 + i)
    assert first.calls == [(2, 100)]
    assert every.calls == [(2, 100), (1, 101), (1, 102), (3, 103)]
    assert rec.token_times_ns == [100, 100, 101, 102, 103, 103, 103] and rec.t_first_token_ns == 100
    assert EnergyObserver.first_token_only


def test_energy_through_the_bookkeeping_equals_every_event_to_the_observer() -> None:
    """The energy observer ignored every call but a stream's first: the ledger's joules are the
    same whether the bookkeeping calls it for every token event or for the first only."""
    out = []
    for first_only in (True, False):
        ledger = Ledger(idle_watts=1.0)
        obs = EnergyObserver(ledger, "estimated", period_seconds=0.1)
        obs.first_token_only = first_only
        book = Bookkeeping(ProxyMetrics(CollectorRegistry()), [obs], [])
        recs = [RequestRecord(request_id=f"r{i}", route="/v1/chat/completions", api="openai", stream=True,
                              t_received_ns=(i * 7 + 1) * MS, t_forwarded_ns=(i * 7 + 2) * MS) for i in range(6)]
        for rec in recs:
            obs.on_request_start(rec)
        t = 0
        for k in range(40):                  # token events over 4 ticks of 100 ms
            t = 20 * MS + k * 9 * MS
            for j, rec in enumerate(recs):
                if (k + j) % 3:
                    book.tokens(rec, 1 + (k % 2), t + j)
        for rec in recs:
            rec.t_end_ns, rec.input_tokens, rec.output_tokens = t + MS, 10, len(rec.token_times_ns)
            obs.on_request_end(rec)
        for i in range(6):
            ledger.add_tick(Tick(i * 100 * MS, (i + 1) * 100 * MS, 5.0 + i, {"g": 5.0 + i}))
        ledger.flush()
        out.append([ledger.release(rec.request_id) for rec in recs])
    assert out[0] == out[1] and all(r is not None and r.full_joules > 0 for r in out[0])


# ---- the split's inlined weight of a stream equals apportion's ---------------------------------------
def test_stream_weight_equals_request_weight_exactly() -> None:
    rng = random.Random(5)
    for _ in range(20000):
        t0 = rng.randrange(-100, 200) * MS
        t1 = t0 + rng.choice([1, 50, 100, 107]) * MS
        pw, window = rng.choice([0.0, 1.0, 2.5]), rng.choice([0, 80]) * MS

        def at(lo: int, hi: int) -> int:      # a time in ms, or one on the tick's or the window's edges
            return rng.choice([rng.randrange(lo, hi) * MS + rng.randrange(0, 999), t0, t1, t1 - 1, t0 - window,
                               t1 + window, t1 - window])
        start = at(-300, 200)
        end = rng.choice([None, max(start, at(-300, 600))])
        first = rng.choice([None, max(start, at(-300, 500))])
        times = sorted(at(-300, 400) for _ in range(rng.randrange(0, 12)))
        counts = rng.choice([None, [rng.randrange(1, 4) for _ in times]])
        v = ReqView("r", start, end, True, first, times, counts, sum(counts or []) or len(times),
                    rng.choice([None, 0, 7, 100]))
        horizon = rng.choice([None, t1 + rng.randrange(-50, 200) * MS, t1 + window, t1 + window - 1])
        forced = rng.random() < 0.3
        try:
            want: float | None = request_weight(v, t0, t1, TOKEN_WEIGHTED, pw, forced, window, horizon)
        except Deferred:
            want = None
        assert stream_weight(v, t0, t1, pw, window, horizon, forced) == want
