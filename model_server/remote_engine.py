"""``RemoteEngine``: the :class:`~model_server.engines.base.Engine` an API worker process uses; the real
engine runs in the engine process (``serve --api-workers N``, :mod:`model_server.engine_hub`).

Owns the worker's end of the engine connection: it sends submits and cancels, and turns each
``tokens`` message (one engine step's tokens for all of this worker's requests) into
:class:`TokenEvent` on each request's queue. Detokenization, stop sequences, SSE and JSON stay in the
HTTP layer, i.e. in this worker. When the connection ends (the engine process exited or died), every
live request ends with an ``error`` event and ``on_lost`` is called. It must not handle HTTP nor
process lifecycle (:mod:`model_server.api_worker` does).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, AsyncIterator, Callable

from model_server import ipc
from model_server.engines.base import (Engine, EngineStats, GenerationRequest, RequestTiming, TokenEvent)

log = logging.getLogger("model_server.api_worker")

LOST = "the engine process exited"


class RemoteEngine(Engine):
    name = "fast"
    supports_seed = True

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_message: Callable[[tuple[Any, ...]], None], on_lost: Callable[[], None]) -> None:
        self.reader, self.writer = reader, writer
        self.on_message = on_message        # messages other than "tokens" (state, stats, exit)
        self.on_lost = on_lost
        self.queues: dict[int, asyncio.Queue] = {}      # handle -> its events, while live
        self.handles: dict[str, int] = {}               # request id -> handle, while live
        self.timings: dict[str, RequestTiming] = {}
        self._ids: dict[int, str] = {}
        self._next = 0
        self._stats = EngineStats()
        self.lost = False
        self._task: asyncio.Task | None = None
        self._stats_waiters: list[asyncio.Future] = []

    # ------------------------------------------------------------------ Engine
    async def start(self) -> None:
        self._task = asyncio.create_task(self._read())

    async def stop(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while drain and self.queues and loop.time() < deadline:
            await asyncio.sleep(0.02)
        self.writer.close()

    def submit(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        queue: asyncio.Queue = asyncio.Queue()
        if self.lost:
            queue.put_nowait(TokenEvent(None, finish_reason="error", error=LOST))
            return self._stream(request.request_id, queue)
        self._next += 1
        h = self._next
        self.queues[h] = queue
        self.handles[request.request_id] = h
        self._ids[h] = request.request_id
        ipc.send(self.writer, ("submit", h, request.request_id, list(request.prompt_ids),
                               dataclasses.astuple(request.params), request.arrival_ns))
        return self._stream(request.request_id, queue)

    def cancel(self, request_id: str) -> None:
        h = self.handles.get(request_id)
        if h is not None and not self.lost:
            ipc.send(self.writer, ("cancel", h))      # the engine answers with a "cancelled" event

    def stats(self) -> EngineStats:
        return self._stats

    async def refresh_stats(self, timeout_s: float = 2.0) -> None:
        """Ask the engine process for its stats now (before a /metrics scrape); keeps the last ones if
        it does not answer in time."""
        if self.lost:
            return
        fut = asyncio.get_running_loop().create_future()
        self._stats_waiters.append(fut)
        ipc.send(self.writer, ("stats?",))
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except asyncio.TimeoutError:
            pass

    def timing(self, request_id: str) -> RequestTiming | None:
        return self.timings.pop(request_id, None)

    def pending_events(self, request_id: str) -> int:
        h = self.handles.get(request_id)
        q = self.queues.get(h) if h is not None else None
        return q.qsize() if q is not None else 0

    # ------------------------------------------------------------------ internals
    async def _stream(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[TokenEvent]:
        finished = False
        try:
            while True:
                ev = await queue.get()
                finished = ev.finish_reason is not None
                yield ev
                if finished:
                    return
        finally:
            if not finished:
                self.cancel(request_id)

    def _end(self, h: int) -> None:
        self.queues.pop(h, None)
        rid = self._ids.pop(h, None)
        if rid is not None:
            self.handles.pop(rid, None)

    def _tokens(self, rows: list[tuple], timings: dict[int, tuple]) -> None:
        queues = self.queues
        for h, tok, lp, fin, err in rows:
            q = queues.get(h)
            if q is None:
                continue
            q.put_nowait(TokenEvent(tok, lp, fin, err))
            if fin is not None:
                rid = self._ids.get(h)
                t = timings.get(h)
                if rid is not None and t is not None:
                    self.timings[rid] = RequestTiming(*t)
                    if len(self.timings) > 10000:
                        self.timings.pop(next(iter(self.timings)))
                self._end(h)

    async def _read(self) -> None:
        try:
            while True:
                msg = await ipc.read_message(self.reader)
                if msg is None:
                    break
                if msg[0] == "tokens":
                    self._tokens(msg[1], msg[2])
                elif msg[0] == "stats":
                    self._stats = msg[1]
                    waiters, self._stats_waiters = self._stats_waiters, []
                    for fut in waiters:
                        if not fut.done():
                            fut.set_result(None)
                else:
                    self.on_message(msg)
        except Exception:  # noqa: BLE001 - a bug here must still fail the live requests below
            log.exception("engine connection failed")
        self.lost = True
        for h, q in list(self.queues.items()):
            q.put_nowait(TokenEvent(None, finish_reason="error", error=LOST))
            self._end(h)
        self.on_lost()
