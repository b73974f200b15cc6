"""The engine process's side of ``serve --api-workers N``: one connection per API worker process.

Owns what crosses to the workers: it queues each worker's submits on the engine
(``FastEngine.submit_to``), applies its cancels, and ships every engine step's events for all of that
worker's requests as ONE ``tokens`` message (the engine calls the worker's sink once per step from
its thread; the sink hands the batch to this process's event loop, which encodes and writes it).
No per-token work per stream happens here: detokenization, SSE and JSON run in the workers.
It also sends the lifecycle state (and what /info and /metrics show) to every worker on each change
(checked twice a second for /info changes without a state change), and stats twice a second. A worker whose connection ends has its live requests cancelled.
It must not spawn or supervise processes (:mod:`model_server.api_workers` does) nor serve HTTP.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, Callable

from model_server import ipc
from model_server.engines.base import GenerationRequest, SamplingParams

log = logging.getLogger("model_server")

STATS_PERIOD_S = 0.5


class _Tag:
    """What the engine holds as a request's 'queue': the worker's handle and the engine-side id."""

    __slots__ = ("handle", "rid")

    def __init__(self, handle: int, rid: str) -> None:
        self.handle, self.rid = handle, rid


class _Sink:
    """What the engine holds as a request's 'event loop': one call per step for this worker."""

    def __init__(self, conn: "WorkerConnection") -> None:
        self.conn = conn

    def call_soon_threadsafe(self, _fn: Any, items: list) -> None:      # engine thread
        self.conn.loop.call_soon_threadsafe(self.conn.ship, items)


class WorkerConnection:
    def __init__(self, hub: "EngineHub", index: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.hub, self.index = hub, index
        self.reader, self.writer = reader, writer
        self.loop = asyncio.get_running_loop()
        self.sink = _Sink(self)
        self.live: dict[int, str] = {}          # handle -> engine request id
        self.listening = asyncio.Event()
        self.drained = asyncio.Event()          # in draining state with no request of its own left
        self.closed = asyncio.Event()
        self.pid: int | None = None

    def send(self, msg: tuple[Any, ...]) -> None:
        ipc.send(self.writer, msg)

    def ship(self, items: list) -> None:
        """One engine step's events for this worker's requests -> one message (event loop)."""
        rows = []
        finals = []
        for tag, events in items:
            for ev in events:
                rows.append((tag.handle, ev.token_id, ev.logprob, ev.finish_reason, ev.error))
                if ev.finish_reason is not None:
                    finals.append(tag)
        timings: dict[int, tuple] = {}
        engine = self.hub.engine()
        for tag in finals:
            self.live.pop(tag.handle, None)
            t = engine.timing(tag.rid) if engine is not None else None
            if t is not None:
                timings[tag.handle] = dataclasses.astuple(t)
        self.send(("tokens", rows, timings))

    def _submit(self, handle: int, rid: str, prompt_ids: list[int], params: tuple, arrival_ns: int) -> None:
        engine = self.hub.engine()
        erid = f"w{self.index}-{rid}"
        error = "model is not ready"
        if engine is not None:
            self.live[handle] = erid
            error = engine.submit_to(GenerationRequest(erid, prompt_ids, SamplingParams(*params), arrival_ns),
                                     self.sink, _Tag(handle, erid))
        if error is not None:
            self.live.pop(handle, None)
            self.send(("tokens", [(handle, None, None, "error", error)], {}))

    def _cancel(self, handle: int) -> None:
        erid = self.live.get(handle)
        engine = self.hub.engine()
        if erid is not None and engine is not None:
            engine.cancel(erid)

    async def run(self) -> None:
        try:
            while True:
                msg = await ipc.read_message(self.reader)
                if msg is None:
                    break
                kind = msg[0]
                if kind == "submit":
                    self._submit(*msg[1:])
                elif kind == "cancel":
                    self._cancel(msg[1])
                elif kind == "stats?":
                    engine = self.hub.engine()
                    if engine is not None:
                        self.send(("stats", engine.stats()))
                elif kind == "drained":
                    self.drained.set()
                elif kind == "listening":
                    self.pid = msg[1]
                    self.listening.set()
        except Exception:  # noqa: BLE001 - one worker's bad message must not stop the engine process
            log.exception("api worker %d: connection failed", self.index)
        finally:
            # the worker exited or died: free the engine slots of its requests
            engine = self.hub.engine()
            for erid in list(self.live.values()):
                if engine is not None:
                    engine.cancel(erid)
            self.live.clear()
            self.writer.close()
            self.closed.set()


class EngineHub:
    """Every worker connection of this engine process."""

    def __init__(self, engine: Callable[[], Any], state: Callable[[], dict[str, Any]]) -> None:
        self.engine = engine           # the running engine, or None while loading
        self.state = state             # the "state" message's payload, built on demand
        self.conns: list[WorkerConnection] = []
        self._stats_task: asyncio.Task | None = None
        self._last_state: dict[str, Any] | None = None

    async def attach(self, index: int, sock) -> WorkerConnection:
        reader, writer = await ipc.open_socket(sock)
        conn = WorkerConnection(self, index, reader, writer)
        self.conns.append(conn)
        asyncio.create_task(conn.run())
        conn.send(("state", self.state()))
        if self._stats_task is None:
            self._stats_task = asyncio.create_task(self._push_stats())
        return conn

    def detach(self, conn: WorkerConnection) -> None:
        """Forget a worker whose connection ended (a restarted worker attaches anew)."""
        if conn in self.conns:
            self.conns.remove(conn)

    def broadcast_state(self) -> None:
        payload = self._last_state = self.state()
        for c in self.conns:
            if not c.closed.is_set():
                c.send(("state", payload))

    def broadcast(self, msg: tuple[Any, ...]) -> None:
        for c in self.conns:
            if not c.closed.is_set():
                c.send(msg)

    async def _push_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_PERIOD_S)
            engine = self.engine()
            if engine is not None:
                self.broadcast(("stats", engine.stats()))
            if self.state() != self._last_state:     # /info changed without a state change (fused_ready)
                self.broadcast_state()

    def live_requests(self) -> int:
        return sum(len(c.live) for c in self.conns)

    def drained(self) -> bool:
        """Every worker still connected has finished its requests (including ones not yet submitted)."""
        return all(c.drained.is_set() or c.closed.is_set() for c in self.conns) and self.live_requests() == 0
