"""Delivery: the fast engine thread's hand-off of token events to asyncio consumers, and the consumer's stream.

The engine thread collects a step's events per event loop (``scheduler.Out``) and calls :func:`flush`
once per step: one ``loop.call_soon_threadsafe`` per loop, whose callback puts each event on its
request's :class:`EventQueue`. :func:`stream` is the consumer side (an async iterator over one request's queue that
cancels the request when the consumer stops early). ``model_server.engine_hub`` passes its own "loop"
(a sink with ``call_soon_threadsafe``) and receives the batches instead.
Must not touch the scheduler's state or tensors.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import AsyncIterator, Callable

from ..base import TokenEvent
from .scheduler import Seq


class EventQueue:
    """One request's undelivered events on its consumer's loop: a deque and at most one waiting consumer.

    What ``asyncio.Queue`` did for the fast engine (``put_nowait``, ``get``, ``qsize``) without its
    general machinery (waiter deques, unfinished-task counts), which ran for every generated token.
    Single consumer; every method runs on the consumer's event loop."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[TokenEvent] = deque()
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, ev: TokenEvent) -> None:
        self._items.append(ev)
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def qsize(self) -> int:
        return len(self._items)

    async def get(self) -> TokenEvent:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._items.popleft()


def deliver(items: list[tuple[asyncio.Queue, list[TokenEvent]]]) -> None:
    """On the consumer's loop: every event onto its request's queue."""
    for q, evs in items:
        for ev in evs:
            q.put_nowait(ev)


def send(seq: Seq, events: list[TokenEvent]) -> None:
    """One request's events, now (cancellations, refusals)."""
    try:
        seq.loop.call_soon_threadsafe(deliver, [(seq.queue, events)])
    except RuntimeError:  # loop closed: consumer is gone
        pass


def flush(out: dict[asyncio.AbstractEventLoop, list]) -> None:
    """One step's events: one call per consumer loop."""
    for loop, items in out.items():
        try:
            loop.call_soon_threadsafe(deliver, items)
        except RuntimeError:
            pass


async def stream(seq: Seq, cancel: Callable[[str], None]) -> AsyncIterator[TokenEvent]:
    """``seq``'s events until its final one; a consumer that stops early cancels the request."""
    finished = False
    q = seq.queue
    ready = q._items                     # events already here are taken without an await
    try:
        while True:
            ev = ready.popleft() if ready else await q.get()
            if ev.finish_reason is not None:
                finished = True
            yield ev
            if finished:
                return
    finally:
        if not finished:
            cancel(seq.req.request_id)

