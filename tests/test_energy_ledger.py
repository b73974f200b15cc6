"""Energy ledger: the apportioning rules on small hand-checked cases (the random-arrival properties:
test_energy_ledger_properties.py)."""
from __future__ import annotations

import math

import pytest

from edge_proxy.energy.apportion import idle_time_shares, ReqView
from edge_proxy.energy.ledger import Ledger
from tests.energy_ledger_support import MS, assert_conserved, tick


# ---- hand-checked cases -----------------------------------------------------------------------

def test_no_request_in_flight_is_all_idle():
    led = Ledger(idle_watts=10.0)
    led.add_tick(tick(0, 100, 50.0))
    t = led.snapshot()
    assert t.idle_joules == 50.0 and t.active_joules == 0.0 and t.pending_joules == 0.0


def test_request_shorter_than_a_tick_gets_the_active_energy():
    led = Ledger(idle_watts=100.0)            # idle share of a 100 ms tick: 10 J
    led.start("r", 40 * MS, "m", stream=True)
    led.tokens("r", 1, 41 * MS, prompt_tokens=3)
    led.end("r", 42 * MS, prompt_tokens=3, output_tokens=1)
    led.add_tick(tick(0, 100, 30.0))
    res = led.result("r")
    assert res is not None and res.final
    assert res.active_joules == pytest.approx(20.0)
    assert res.full_joules == pytest.approx(20.0 + 10.0 * 0.02)   # ran 2 ms of the 100 ms tick
    assert_conserved(led)


def test_twice_the_tokens_twice_the_active_share():
    led = Ledger(idle_watts=0.0, prefill_weight=0.0)
    led.start("a", 0, "m", True)
    led.start("b", 0, "m", True)
    for k in range(10):
        t = (5 + 10 * k) * MS
        led.tokens("a", 1, t)
        led.tokens("b", 2, t)
    led.end("a", 100 * MS, 0, 10)
    led.end("b", 100 * MS, 0, 20)
    led.add_tick(tick(0, 100, 90.0))
    a, b = led.result("a"), led.result("b")
    assert a is not None and b is not None
    assert b.active_joules == pytest.approx(2 * a.active_joules)
    assert a.active_joules + b.active_joules == pytest.approx(90.0)


def test_first_token_tick_waits_for_prompt_count_then_uses_prefill_weight():
    led = Ledger(idle_watts=0.0, prefill_weight=0.5)
    led.start("a", 0, "m", True)
    led.start("b", 0, "m", True)
    led.tokens("a", 1, 50 * MS)                 # first token of a: prompt count unknown (usage comes last)
    led.tokens("b", 1, 20 * MS, prompt_tokens=0)
    led.add_tick(tick(0, 100, 40.0))
    led.add_tick(tick(100, 200, 0.0))
    assert led.snapshot().pending_joules == 40.0   # the first tick is deferred (the newest one is unsettled)
    led.end("b", 120 * MS, 0, 1)
    assert led.result("b") is not None and not led.result("b").final   # overlaps the deferred tick
    led.end("a", 150 * MS, prompt_tokens=18, output_tokens=1)          # weight a = 1 + 0.5*18 = 10, b = 1
    led.add_tick(tick(200, 300, 0.0))
    a, b = led.result("a"), led.result("b")
    assert a.final and b.final
    assert a.active_joules == pytest.approx(40.0 * 10 / 11)
    assert b.active_joules == pytest.approx(40.0 * 1 / 11)
    assert_conserved(led)


def test_deferral_is_bounded_in_time():
    led = Ledger(idle_watts=0.0, max_defer_seconds=0.5)
    led.start("a", 0, "m", True)
    led.tokens("a", 3, 10 * MS)                 # prompt count never arrives, request never ends
    for k in range(10):
        led.add_tick(tick(100 * k, 100 * (k + 1), 1.0))
    t = led.snapshot()
    assert led.pending_ticks <= 6
    assert t.ticks_forced >= 1
    assert_conserved(led)


def test_pending_ticks_are_bounded_in_count():
    led = Ledger(idle_watts=0.0, max_pending_ticks=4, max_defer_seconds=3600)
    led.start("a", 0, "m", stream=False)        # non-streaming: weights unknown until it ends
    for k in range(20):
        led.add_tick(tick(100 * k, 100 * (k + 1), 2.0))
    assert led.pending_ticks <= 4
    assert_conserved(led)


def test_learned_idle_from_empty_ticks():
    led = Ledger(idle_watts=None, idle_settle_seconds=0.0)
    for k in range(5):
        led.add_tick(tick(100 * k, 100 * (k + 1), 7.5))     # 75 W idle
    assert led.idle_watts == pytest.approx(75.0)
    led.start("r", 500 * MS, "m", True)
    led.tokens("r", 1, 550 * MS, prompt_tokens=1)
    led.end("r", 600 * MS, 1, 1)
    led.add_tick(tick(500, 600, 40.0))
    led.add_tick(tick(600, 700, 7.5))
    r = led.result("r")
    assert r.active_joules == pytest.approx(40.0 - 7.5)
    assert r.full_joules == pytest.approx(40.0)


def test_gap_ticks_do_not_teach_idle():
    led = Ledger(idle_watts=None, idle_settle_seconds=0.0)
    led.add_tick(tick(0, 100, 0.0, gap=True))               # reset clamped to 0 J
    led.add_tick(tick(100, 200, 8.0))
    assert led.idle_watts == pytest.approx(80.0)


def test_non_streaming_weight_is_spread_over_its_lifetime():
    led = Ledger(idle_watts=0.0, prefill_weight=0.0)
    led.start("s", 0, "m", stream=True)
    led.start("n", 0, "m", stream=False)
    for k in range(20):
        led.tokens("s", 1, (5 + 10 * k) * MS)
    led.tokens("n", 20, 199 * MS)              # non-streaming: all tokens at the response time
    led.end("s", 200 * MS, 0, 20)
    led.end("n", 200 * MS, 0, 20)
    led.add_tick(tick(0, 100, 10.0))
    led.add_tick(tick(100, 200, 10.0))
    led.add_tick(tick(200, 300, 0.0))
    s, n = led.result("s"), led.result("n")
    assert n.attribution == "time-weighted" and s.attribution == "token-weighted"
    assert s.active_joules == pytest.approx(10.0) and n.active_joules == pytest.approx(10.0)


def test_time_weighted_method_splits_by_overlap():
    led = Ledger(idle_watts=0.0, method="time-weighted")
    led.start("a", 0, "m", True)
    led.start("b", 50 * MS, "m", True)
    led.tokens("a", 100, 10 * MS)
    led.end("a", 100 * MS)
    led.end("b", 100 * MS)
    led.add_tick(tick(0, 100, 30.0))
    led.add_tick(tick(100, 200, 0.0))
    assert led.result("a").active_joules == pytest.approx(20.0)
    assert led.result("b").active_joules == pytest.approx(10.0)


def test_not_final_until_a_tick_closes_after_the_end():
    led = Ledger(idle_watts=0.0)
    led.start("r", 0, "m", True)
    led.tokens("r", 1, 10 * MS, prompt_tokens=1)
    led.add_tick(tick(0, 100, 5.0))
    led.end("r", 150 * MS, 1, 1)
    assert not led.result("r").final
    est = led.estimate("r", 150 * MS)
    assert est is not None and not est.final and est.full_joules >= 5.0 - 1e-9
    led.add_tick(tick(100, 200, 5.0))
    assert led.result("r").final
    assert led.result("r").full_joules == pytest.approx(10.0)


def test_idle_time_shares_split_concurrent_time_equally():
    reqs = [ReqView("a", 0, 100, True), ReqView("b", 50, 100, True)]
    f = idle_time_shares(reqs, 0, 200)
    assert f["a"] == pytest.approx(0.25 + 0.125)
    assert f["b"] == pytest.approx(0.125)


def test_held_request_carries_no_energy_until_forwarded():
    fwd: dict[str, int | None] = {"t": None}
    led = Ledger(idle_watts=10.0)
    led.start("held", 0, "m", True, forwarded=lambda: fwd["t"])
    for k in range(5):                                   # a cold start: 500 ms at 400 W
        led.add_tick(tick(100 * k, 100 * (k + 1), 40.0))
    assert led.result("held").full_joules == 0.0
    assert led.snapshot().idle_joules == pytest.approx(200.0)
    fwd["t"] = 500 * MS
    led.tokens("held", 1, 550 * MS, prompt_tokens=2)
    led.end("held", 560 * MS, 2, 1)
    led.add_tick(tick(500, 600, 20.0))
    r = led.result("held")
    assert r.final and r.active_joules == pytest.approx(19.0)
    assert r.full_joules == pytest.approx(19.0 + 1.0 * 0.6)


def test_rejected_request_never_forwarded_gets_nothing():
    led = Ledger(idle_watts=0.0)
    led.start("rej", 0, "m", True, forwarded=lambda: None)
    led.end("rej", 50 * MS)
    led.add_tick(tick(0, 100, 10.0))
    r = led.result("rej")
    assert r.final and r.full_joules == 0.0
    assert_conserved(led)


def test_ticks_while_requests_are_held_do_not_teach_idle():
    led = Ledger(idle_watts=None, idle_settle_seconds=0.0)
    led.add_tick(tick(0, 100, 7.5))                      # 75 W idle
    led.start("held", 100 * MS, "m", True, forwarded=lambda: None)
    for k in range(1, 6):                                # model loading at 300 W while the request waits
        led.add_tick(tick(100 * k, 100 * (k + 1), 30.0))
    assert led.idle_watts == pytest.approx(75.0)
    assert_conserved(led)


def test_prefill_weight_is_spread_over_the_window_before_the_first_token():
    """16-request burst, one request admitted a few ms before the others: its first token lands in
    a tick where the others are still in prefill. With the prefill window they share that tick."""
    led = Ledger(idle_watts=0.0, prefill_weight=1.0, prefill_window_seconds=0.08)
    led.start("early", 90 * MS, "m", True)
    led.start("late", 91 * MS, "m", True)
    led.tokens("early", 1, 97 * MS, prompt_tokens=20)      # prefill window [90, 97] ms: tick 0
    led.add_tick(tick(0, 100, 10.0))
    assert led.pending_ticks == 1                          # "late" may still have prefill in it
    led.tokens("late", 1, 104 * MS, prompt_tokens=20)     # window [91, 104]: 9/13 in tick 0
    led.add_tick(tick(100, 200, 0.0))
    led.end("early", 150 * MS, 20, 1)
    led.end("late", 150 * MS, 20, 1)
    led.add_tick(tick(200, 300, 0.0))
    e, l_ = led.result("early"), led.result("late")
    w_early, w_late = 20 + 1, 20 * 9 / 13
    assert e.active_joules == pytest.approx(10.0 * w_early / (w_early + w_late))
    assert l_.active_joules == pytest.approx(10.0 * w_late / (w_early + w_late))
    assert_conserved(led)


def test_tick_waits_no_longer_than_the_window_for_a_first_token():
    led = Ledger(idle_watts=0.0, prefill_window_seconds=0.08)
    led.start("a", 0, "m", True)
    led.tokens("a", 1, 10 * MS, prompt_tokens=1)
    led.start("slow", 50 * MS, "m", True)                # queued: no first token for a long time
    led.add_tick(tick(0, 100, 5.0))
    led.add_tick(tick(100, 200, 5.0))                     # horizon - t1 = 100 ms >= 80 ms: tick 0 splits
    assert led.snapshot().pending_joules == pytest.approx(5.0)
    assert led.result("a").active_joules == pytest.approx(5.0)


def test_split_weights_with_subnormal_weights_conserves() -> None:
    from edge_proxy.energy.apportion import split_weights

    for weights in ({"a": 5e-324}, {"a": 5e-324, "b": 1e-323}, {"a": 5e-324, "b": 0.0, "c": 2.5e-323}):
        shares = split_weights(1.5, weights)
        assert math.isclose(sum(shares.values()), 1.5, rel_tol=1e-12)
        assert all(0.0 <= v <= 1.5 for v in shares.values())
