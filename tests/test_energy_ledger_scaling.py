"""The energy ledger under concurrency: the work per tick and per request does not grow with the
number of requests that already finished, the event loop's calls never wait for the ledger's
lock, and the fast split (tick_split) gives the joules of the reference formulas (apportion)."""
from __future__ import annotations

import math
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_proxy.energy.apportion import ReqView, split_tick
from edge_proxy.energy.ledger import Ledger
from edge_proxy.energy.ledger_types import PendingTick, Req
from edge_proxy.energy.readings import Tick
from edge_proxy.energy.tick_split import compute_split

MS = 1_000_000


def run_steady_load(led: Ledger, concurrency: int, n_ticks: int, sample_every: int = 10):
    """Closed loop: ``concurrency`` streams of 8 tokens (one every 50 ms, prompt count known only at
    the end, as OpenAI streams report it), a new one as soon as one ends; 100 ms ticks; every
    finished request is released as the proxy's finalize does. Returns sizes sampled over time."""
    samples = []
    seq = 0
    streams: dict[str, tuple[int, list[int]]] = {}

    def open_stream(t: int) -> None:
        nonlocal seq
        rid = f"r{seq}"
        seq += 1
        times: list[int] = []
        streams[rid] = (t, times)
        led.start(rid, t, "m", True, token_times=times)

    for i in range(concurrency):
        open_stream(i * 400_000)          # staggered over the first 400 ms
    finished: list[str] = []
    for k in range(n_ticks):
        t0, t1 = k * 100 * MS, (k + 1) * 100 * MS
        for step in range(2):             # token events in this tick, then ends, then new streams
            now = t0 + step * 50 * MS + 25 * MS
            for rid, (start, times) in list(streams.items()):
                if now <= start:
                    continue
                times.append(now)
                if len(times) == 1:
                    led.tokens(rid, 1, now)
                if len(times) == 8:
                    led.end(rid, now + 1, prompt_tokens=5, output_tokens=8)
                    del streams[rid]
                    finished.append(rid)
                    open_stream(now + 2)
        led.add_tick(Tick(t0, t1, 30.0, {"GPU-x": 30.0}))
        for rid in finished[:]:
            if led.is_final(rid):
                led.release(rid)
                finished.remove(rid)
        if k % sample_every == sample_every - 1:
            samples.append((seq - concurrency, led.sizes(), len(finished)))
    return samples


@pytest.mark.parametrize("concurrency", [40, 300])     # below and above the busy-merge threshold
def test_ledger_state_and_work_do_not_grow_with_finished_requests(concurrency: int) -> None:
    led = Ledger(idle_watts=50.0)
    samples = run_steady_load(led, concurrency, n_ticks=300, sample_every=1)

    def peak(window: list) -> dict[str, int]:
        return {k: max(s[1][k] for s in window) for k in window[0][1]}
    early, late = peak(samples[20:100]), peak(samples[-80:])
    finished_early, finished_late = samples[100][0], samples[-1][0]
    waiting = max(s[2] for s in samples[-80:])
    assert finished_late > 2.5 * finished_early and finished_late > 3 * concurrency   # many finished
    # what a tick's split walks (the requests listed by pending ticks), what is open and what
    # waits for finality stays at the level of the concurrency, not of the requests finished
    for key in ("open", "active", "members", "pending", "check", "queued"):
        assert late[key] <= early[key] * 1.5 + 16, (key, early, late)
    assert late["open"] <= 3 * concurrency and late["members"] <= 8 * concurrency
    assert late["done"] <= concurrency and waiting <= 2 * concurrency     # finals are handed back
    tot = led.snapshot()
    assert tot.active_joules + tot.idle_joules + tot.foreign_joules + tot.pending_joules == pytest.approx(
        tot.measured_joules, rel=1e-9)


def test_a_source_that_never_ticks_holds_no_request_state() -> None:
    """A remote server without a GPU never produces a tick: requests are handed back (provisional,
    0 J) by finalize and the ledger must not keep them, nor their queued events."""
    led = Ledger(max_queued_events=500)
    for i in range(20_000):
        rid = f"r{i}"
        led.start(rid, i * MS, "m", True, token_times=[i * MS + 1])
        led.tokens(rid, 1, i * MS + 1)
        led.end(rid, i * MS + 2, 3, 1)
        assert led.release(rid) is None                 # not final: no tick ever came
    sizes = led.sizes()
    assert sizes["queued"] <= 500 and sizes["active"] <= 200 and sizes["open"] <= 200, sizes


def test_event_loop_calls_never_wait_for_the_ledger_lock() -> None:
    """start/tokens/end/is_final/release of a final request/snapshot must not block while the
    sampler thread holds the lock (a long split): the event loop would stall."""
    led = Ledger(idle_watts=0.0)
    led.start("done", 0, "m", True)
    led.tokens("done", 1, 10 * MS, prompt_tokens=1)
    led.end("done", 20 * MS, 1, 1)
    led.add_tick(Tick(0, 100 * MS, 5.0, {"g": 5.0}))
    assert led.is_final("done")
    held = threading.Event()
    release = threading.Event()

    def hold_lock() -> None:
        with led._lock:                  # what the sampler thread does during a split
            held.set()
            release.wait(10)
    holder = threading.Thread(target=hold_lock)
    holder.start()
    held.wait(5)
    results: dict[str, object] = {}

    def loop_side() -> None:
        led.start("a", 150 * MS, "m", True, token_times=[])
        led.tokens("a", 1, 160 * MS, prompt_tokens=3)
        led.set_model("a", "m2")
        led.end("a", 170 * MS, 3, 1)
        results["final"] = led.is_final("a")
        results["released"] = led.release("done")
        results["snapshot"] = led.snapshot()
        results["estimate"] = led.estimate("a", 180 * MS)    # bounded wait, then lock-free
    t = threading.Thread(target=loop_side)
    t.start()
    t.join(2.0)
    blocked = t.is_alive()
    release.set()
    holder.join()
    t.join()
    assert not blocked, "an event-loop call waited for the ledger's lock"
    assert results["final"] is False
    rel = results["released"]
    assert rel is not None and rel.final and rel.active_joules == pytest.approx(5.0)
    assert results["estimate"] is not None


# ---- the fast split gives the reference formulas' joules --------------------------------------

req_st = st.fixed_dictionaries({
    "start": st.integers(-150, 140), "dur": st.one_of(st.none(), st.integers(0, 300)),
    "stream": st.booleans(), "first": st.one_of(st.none(), st.integers(-120, 140)),
    "tokens": st.lists(st.integers(-100, 199), max_size=6), "prompt": st.one_of(st.none(), st.integers(0, 50)),
})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(req_st, min_size=1, max_size=12), dE=st.floats(0.0, 100.0),
       idle=st.floats(0.0, 500.0), method=st.sampled_from(["token-weighted", "time-weighted"]),
       prefill=st.floats(0.0, 2.0), forced=st.booleans())
def test_fast_split_equals_reference_split(reqs, dE, idle, method, prefill, forced) -> None:
    t0, t1 = 0, 100 * MS
    members = []
    for i, d in enumerate(reqs):
        s = d["start"] * MS
        e = None if d["dur"] is None else s + d["dur"] * MS
        first = None if d["first"] is None else max(s, d["first"] * MS)
        times = sorted(max(s, x * MS) for x in d["tokens"] if e is None or x * MS <= e)
        if first is not None and times:
            first = min(first, times[0])
        v = ReqView(f"r{i}", s, e, d["stream"], first_token_ns=first, ev_t=times, ev_n=None,
                    prompt_tokens=d["prompt"])
        members.append(Req(v, "m", method))
    p = PendingTick(Tick(t0, t1, dE, {"g": dE}), members=members)
    try:
        ref = split_tick(t0, t1, dE, [r.view for r in members], idle, method, prefill, forced,
                         80 * MS, 150 * MS)
    except Exception:  # Deferred
        ref = None
    fast = compute_split(p, method, prefill, 80 * MS, 150 * MS, idle, forced)
    if ref is None:
        assert isinstance(fast, list) and fast and not forced
        return
    assert not isinstance(fast, list)
    assert math.isclose(fast.idle, ref.idle, rel_tol=1e-12, abs_tol=1e-12)
    got_a = {r.view.rid: a for r, a in zip(fast.reqs, fast.active)}
    got_i = {r.view.rid: i for r, i in zip(fast.reqs, fast.idle_by)}
    assert set(got_a) == set(ref.active)
    for rid, a in ref.active.items():
        assert math.isclose(got_a[rid], a, rel_tol=1e-9, abs_tol=1e-9), (rid, got_a[rid], a)
        assert math.isclose(got_i[rid], ref.idle_by_request[rid], rel_tol=1e-9, abs_tol=1e-9)
