"""Deferred ticks and the requests they wait for (the ledger core's bookkeeping).

A tick whose split needs a weight not known yet (a prompt count, a first token that may still land
in its prefill window, a non-streaming request's end) records those requests as its *blockers*,
and each blocker records the tick. The ledger re-checks a blocker only when that request changed
(first token, prompt count, end: it is marked dirty) or, for a first token that never came, once
the newest tick is past the prefill window's reach (``wake_at``); the tick is tried again only
when it has no blocker left. So a waiting tick costs nothing per new tick, and every check is
O(1): no pass over the ticks times the requests.
"""
from __future__ import annotations

from typing import Callable

from edge_proxy.energy.apportion import Deferred, request_weight
from edge_proxy.energy.ledger_types import PendingTick, Req


def blocks(r: Req, p: PendingTick, method: str, prefill_weight: float, window_ns: int,
           horizon_ns: int | None) -> bool:
    """True while r's weight in p's tick is still unknown. A request that has ended never blocks
    (``request_weight`` defers only while the end is unknown): no weight is computed for it."""
    if r.view.end_ns is not None:
        return False
    t0, t1 = p.tick.t0_ns, p.tick.t1_ns
    if not r.view.overlaps(t0, t1):
        return False
    try:
        request_weight(r.view, t0, t1, method, prefill_weight, False, window_ns, horizon_ns)
    except Deferred:
        return True
    return False


def register(p: PendingTick, blockers: list[Req], window_ns: int) -> None:
    """p waits for ``blockers``. ``wake_at`` only when one of them can stop blocking with time alone
    (a stream before its first token: its prefill window moves out of the tick's reach); the others
    (a response whose token times are unknown, waiting for its end; a prompt count) stop blocking
    only through an event of their own, which marks them dirty."""
    unblock(p)
    p.blockers = set(blockers)
    p.wake_at = None
    for r in blockers:
        r.blocking.append(p)
        v = r.view
        if v.first_token_ns is None and v.token_times_known:
            p.wake_at = p.tick.t1_ns + window_ns


def unblock(p: PendingTick) -> None:
    for r in p.blockers:
        if p in r.blocking:
            r.blocking.remove(p)
    p.blockers = set()


def recheck(dirty: list[Req], still_blocks: Callable[[Req, PendingTick], bool]) -> None:
    """Requests that changed: re-check each for the ticks it blocks (O(changes))."""
    for r in dirty:
        r.dirty = False
        still = []
        for p in r.blocking:
            if still_blocks(r, p):
                still.append(p)
            else:
                p.blockers.discard(r)
        r.blocking = still


def wake(p: PendingTick, still_blocks: Callable[[Req, PendingTick], bool]) -> None:
    """The newest tick passed p's ``wake_at``: re-check all its blockers once."""
    p.wake_at = None
    for r in [r for r in p.blockers if not still_blocks(r, p)]:
        p.blockers.discard(r)
        r.blocking.remove(p)
