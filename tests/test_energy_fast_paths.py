"""The cheaper paths of issue 17 compute exactly what the plain ones did (not approximately: the
same floats, in the same order), so energy attribution is unchanged:

- the idle-share sweep that counts requests in flight over the whole tick with the ``base`` ones,
  against the plain sweep over every request (binary searches per bound);
- ``tick_split.compute_split`` (one pass, inlined weights) against the plain composition of
  ``apportion``'s functions it replaced;
- the estimated source's process tree listed from ``/proc/PID/task/TID/children`` against psutil's
  scan of every process, and liveness from a pidfd against ``psutil.pid_exists``;
- the energy observer's callback finalize (``finalize_soon``) calls back exactly once.
"""
from __future__ import annotations

import asyncio
import bisect
import random
import subprocess
import sys
import time

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_proxy.energy.apportion import (
    TOKEN_WEIGHTED, ReqView, idle_share_joules, idle_time_shares_base, tick_weights, tokens_between)
from edge_proxy.energy.ledger import Ledger
from edge_proxy.energy.ledger_types import PendingTick, Req
from edge_proxy.energy.observer import EnergyObserver
from edge_proxy.energy.process_cpu import descendants, pid_alive, open_pidfd, close_pidfd
from edge_proxy.energy.readings import Tick
from edge_proxy.energy.tick_split import compute_split
from edge_proxy.proxy.hooks import RequestRecord

MS = 1_000_000


# ---- references: the plain algorithms the fast paths replaced ----------------------------------
def plain_idle_shares(reqs: list[ReqView], t0: int, t1: int, base: int) -> tuple[dict[str, float], float]:
    dt = t1 - t0
    if dt <= 0:
        return {r.rid: 0.0 for r in reqs}, 0.0
    spans = []
    for r in reqs:
        a = max(r.start_ns, t0)
        b = t1 if r.end_ns is None else min(r.end_ns, t1)
        spans.append((r.rid, a, max(a, b)))
    bounds = sorted({t0, t1, *(a for _, a, _ in spans), *(b for _, _, b in spans)})
    starts = sorted(a for _, a, b in spans if b > a)
    ends = sorted(b for _, a, b in spans if b > a)
    cum = [0.0]
    for lo, hi in zip(bounds, bounds[1:]):
        c = base + bisect.bisect_right(starts, lo) - bisect.bisect_right(ends, lo)
        cum.append(cum[-1] + ((hi - lo) / c if c > 0 else 0.0))
    out = {}
    for rid, a, b in spans:
        out[rid] = (cum[bisect.bisect_left(bounds, b)] - cum[bisect.bisect_left(bounds, a)]) / dt if b > a else 0.0
    return out, (cum[-1] / dt if base else 0.0)


def plain_split(p: PendingTick, method: str, pw: float, window: int, horizon: int | None, idle_watts: float,
                forced: bool):
    tk = p.tick
    t0, t1 = tk.t0_ns, tk.t1_ns
    token_w = method == TOKEN_WEIGHTED
    steady, other = [], []
    for r in p.members or ():
        if r.forwarded is not None and not r.in_flight():
            continue
        v = r.view
        s, e = v.start_ns, v.end_ns
        if s >= t1 or (e is not None and e < t0):
            continue
        ft = v.first_token_ns
        if s <= t0 and (e is None or e >= t1) and (not token_w or (
                v.token_times_known and ft is not None and ft < t0)):
            steady.append(r)
        else:
            other.append(r)
    raw, blockers = tick_weights([r.view for r in other], t0, t1, method, pw, forced, window, horizon)
    if blockers:
        return [r.view.rid for r in other if r.view.rid in set(blockers)]
    dE = max(0.0, tk.joules)
    other = [r for r in other if r.view.overlap_ns(t0, t1) > 0 or raw[r.view.rid] is None
             or raw[r.view.rid] > 0]
    if not steady and not other:
        return dE, dE, [], [], []
    idle = idle_share_joules(dE, idle_watts, tk.idle_seconds)
    active = dE - idle
    ws = ([float(tokens_between(r.view.ev_t, r.view.ev_n, t0, t1)) for r in steady] if token_w
          else [float(t1 - t0)] * len(steady))
    ws += [raw[r.view.rid] for r in other]
    reqs = steady + other
    known = [w for w in ws if w is not None]
    mean = sum(known) / len(known) if known and sum(known) > 0 else 1.0
    weights = [mean if w is None else max(0.0, w) for w in ws]
    total = sum(weights)
    if total <= 0:
        weights = [float(r.view.overlap_ns(t0, t1)) for r in reqs]
        total = sum(weights)
    if total <= 0:
        weights, total = [1.0] * len(reqs), float(len(reqs))
    act = [active * (w / total) for w in weights]
    shares, steady_share = plain_idle_shares([r.view for r in other], t0, t1, len(steady))
    idle_by = [idle * steady_share] * len(steady) + [idle * shares[r.view.rid] for r in other]
    return dE, idle, [r.view.rid for r in reqs], act, idle_by


# ---- idle shares ---------------------------------------------------------------------------------
span_st = st.tuples(st.integers(-60, 160), st.one_of(st.none(), st.integers(-60, 260)))


@settings(max_examples=400, deadline=None)
@given(spans=st.lists(span_st, max_size=10), t0=st.integers(0, 50), dt=st.integers(0, 100),
       base=st.integers(0, 3), whole=st.integers(0, 4))
def test_idle_shares_equal_the_plain_sweep_exactly(spans, t0, dt, base, whole) -> None:
    t1 = t0 + dt
    reqs = [ReqView(f"r{i}", s, e, False) for i, (s, e) in enumerate(spans)]
    reqs += [ReqView(f"w{i}", t0 - 5, None, False) for i in range(whole)]    # in flight throughout
    got = idle_time_shares_base(reqs, t0, t1, base)
    want = plain_idle_shares(reqs, t0, t1, base)
    assert got == want and list(got[0]) == list(want[0])


# ---- the split -----------------------------------------------------------------------------------
member_st = st.fixed_dictionaries({
    "start": st.integers(-300, 140), "dur": st.one_of(st.none(), st.integers(0, 400)),
    "stream": st.booleans(), "first": st.one_of(st.none(), st.integers(0, 200)),
    "tokens": st.lists(st.integers(0, 400), max_size=6), "prompt": st.one_of(st.none(), st.integers(0, 50)),
    "output": st.one_of(st.none(), st.integers(0, 40)), "held": st.sampled_from([None, "held", "sent"]),
    "jitter": st.integers(0, 999_999),     # odd nanoseconds: ratios that do not come out round
})


def _members(specs: list[dict]) -> list[Req]:
    out = []
    for i, d in enumerate(specs):
        s = d["start"] * MS + d["jitter"]
        e = None if d["dur"] is None else s + d["dur"] * MS + d["jitter"] // 3
        first = None
        times: list[int] = []
        if d["stream"] and d["first"] is not None:
            first = s + d["first"] * MS
            times = sorted({first, *(first + x * MS for x in d["tokens"])})
        v = ReqView(f"r{i}", s, e, d["stream"], first_token_ns=first, ev_t=times, ev_n=None,
                    prompt_tokens=d["prompt"], output_tokens=d["output"])
        fwd = {None: None, "held": (lambda: None), "sent": (lambda x=s + 3 * MS: x)}[d["held"]]
        out.append(Req(v, "m", TOKEN_WEIGHTED, fwd))
    return out


def _assert_same_split(tick: Tick, specs, method: str, pw: float, hz: int | None, idle: float,
                       forced: bool) -> None:
    """The fast split and the plain one agree exactly (==) on the same tick and members."""
    fast = compute_split(PendingTick(tick, _members(specs)), method, pw, 80 * MS, hz, idle, forced)
    plain = plain_split(PendingTick(tick, _members(specs)), method, pw, 80 * MS, hz, idle, forced)
    if isinstance(plain, list):
        assert isinstance(fast, list) and [r.view.rid for r in fast] == plain
    else:
        assert not isinstance(fast, list)
        assert (fast.dE, fast.idle, [r.view.rid for r in fast.reqs], fast.active, fast.idle_by) == plain


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(member_st, max_size=12), dE=st.floats(0.0, 100.0), dt=st.sampled_from([0, 1, 100]),
       idle=st.sampled_from([0.0, 5.0, 1e9]), method=st.sampled_from(["token-weighted", "time-weighted"]),
       pw=st.sampled_from([0.0, 1.0, 2.5]), forced=st.booleans(),
       horizon=st.one_of(st.none(), st.integers(0, 300)))
def test_fast_split_equals_the_plain_split_exactly(specs, dE, dt, idle, method, pw, forced, horizon) -> None:
    t0, t1 = 0, dt * MS
    hz = None if horizon is None else horizon * MS
    tick = Tick(t0, t1, dE, {"g": dE})
    _assert_same_split(tick, specs, method, pw, hz, idle, forced)


def test_fast_split_equals_the_plain_split_on_seeded_random_ticks() -> None:
    # (hypothesis favours round values; busy ticks with odd times are what production sees)
    rng = random.Random(17)
    for _ in range(3000):
        specs = [{"start": rng.randrange(-300, 140), "dur": rng.choice([None, rng.randrange(0, 400)]),
                  "stream": rng.random() < 0.4, "first": rng.choice([None, rng.randrange(0, 200)]),
                  "tokens": [rng.randrange(0, 400) for _ in range(rng.randrange(0, 6))],
                  "prompt": rng.choice([None, 0, 8, 100]), "output": rng.choice([None, 0, 5, 32]),
                  "held": rng.choice([None, None, "held", "sent"]), "jitter": rng.randrange(0, 999_999)}
                 for _ in range(rng.randrange(0, 16))]
        dt, dE = rng.choice([0, 1, 100, 107]), rng.choice([0.0, rng.random() * 50])
        idle, pw = rng.choice([0.0, 5.0, 1e9]), rng.choice([0.0, 1.0, 2.5])
        method = rng.choice(["token-weighted", "time-weighted"])
        forced = rng.random() < 0.4
        hz = rng.choice([None, rng.randrange(0, 300) * MS])
        tick = Tick(0, dt * MS + 12_345 * (dt > 1), dE, {"g": dE})
        _assert_same_split(tick, specs, method, pw, hz, idle, forced)


# ---- the estimated source's process tree ----------------------------------------------------------
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_process_tree_and_liveness_are_psutils() -> None:
    script = ("import subprocess, sys, time; kids = [subprocess.Popen(['sleep', '30']) for _ in range(2)]; "
              "print('up', flush=True); time.sleep(30)")
    top = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert top.stdout is not None and top.stdout.readline().strip() == "up"
        root = psutil.Process(top.pid)
        tree = descendants(root)
        assert [p.pid for p, _ in tree] == [p.pid for p in root.children(recursive=True)]
        assert len(tree) == 2
        for p, fd in tree:
            assert pid_alive(p.pid, fd) and psutil.pid_exists(p.pid)
        victim, fd = tree[0]
        victim.kill()                      # its parent sleeps: it stays a zombie, which still exists
        for _ in range(500):
            if victim.status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.01)
        assert pid_alive(victim.pid, fd) == psutil.pid_exists(victim.pid)
        for _, f in tree:
            close_pidfd(f)
    finally:
        for p in psutil.Process(top.pid).children(recursive=True):
            p.kill()
        top.kill()
        top.wait(5)
    fd = open_pidfd(top.pid)
    assert fd is None                      # gone: no pidfd, and psutil says the same
    assert pid_alive(top.pid, fd) == psutil.pid_exists(top.pid)


# ---- the callback finalize -------------------------------------------------------------------------
def _rec(rid: str, t_ns: int) -> RequestRecord:
    return RequestRecord(request_id=rid, route="/v1/completions", api="openai", stream=True,
                         t_received_ns=t_ns, t_forwarded_ns=t_ns)


@pytest.mark.asyncio
async def test_finalize_soon_calls_back_once_when_final() -> None:
    ledger = Ledger(idle_watts=0.0)
    obs = EnergyObserver(ledger, "nvml", period_seconds=10.0, finalize_wait_seconds=30.0)
    now = time.monotonic_ns()
    ledger.add_tick(Tick(now - 2_000_000_000, now - 1_000_000_000, 0.0, {"g": 0.0}))   # alive
    a, b = _rec("a", now), _rec("b", now)
    obs.on_request_start(a)
    obs.on_request_start(b)
    a.t_end_ns = now + 5_000_000
    obs.on_request_end(a)
    ledger.add_tick(Tick(now - 1_000_000_000, now + 10_000_000, 4.0, {"g": 4.0}))      # b keeps it open
    calls: list[RequestRecord] = []
    obs.finalize_soon(a, calls.append)
    assert calls == [] and a.energy is None                # waiting for the settling tick
    ledger.add_tick(Tick(now + 10_000_000, now + 100_000_000, 1.0, {"g": 1.0}))
    for _ in range(100):
        if calls:
            break
        await asyncio.sleep(0.01)
    assert calls == [a] and a.energy is not None and not a.energy.provisional
    assert not obs._waiters
    # already final (or unknown to the ledger): called back at once
    c = _rec("c", now)
    obs.finalize_soon(c, calls.append)
    assert calls == [a, c] and c.energy is not None
