"""The lean relay's connection pool and response object (plain http backends).

Owns: keep-alive connections to one backend (:class:`RelayPool`), sending one request on one
(:meth:`RelayPool.request`, returns at the response head), the response object
(:class:`RawResponse`: what the proxy uses of ``aiohttp.ClientResponse``: status, reason, headers,
read, release, close, plus attach/detach of a synchronous body sink) and the request head's bytes
(:func:`request_head`). Must not: parse responses (``raw_http``), frame SSE or account tokens
(``relay_raw``).
"""
from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp.client_reqrep import ConnectionKey
from multidict import CIMultiDict

from edge_proxy.proxy.raw_http import Sink, _BackendProtocol

# A kept-alive backend connection idle longer than this is closed instead of reused: servers close
# idle connections after their own keep-alive timeout (uvicorn: 5 s), and a request sent on one
# that the server is closing at that moment fails before any response byte (see RelayPool.request).
MAX_IDLE_REUSE_SECONDS = 4.0


class RawResponse:
    """What the proxy needs of a backend response (``relay.BackendResponse``), over
    :class:`_BackendProtocol`."""

    def __init__(self, pool: "RelayPool", proto: _BackendProtocol, timeout: float) -> None:
        self._pool = pool
        self._proto = proto
        self._timeout = timeout
        self.status = proto.status
        self.reason = proto.reason
        self.headers = proto.headers
        self.head_ns = proto.head_ns     # when the head arrived (body bytes may share that read)
        self._released = False

    def attach(self, sink: Sink) -> None:
        """Deliver body bytes to ``sink(data, t_ns)`` from now on (buffered bytes first)."""
        p = self._proto
        pending, p.pending = p.pending, []
        for data in pending:
            sink(data, p.last_ns)
        p.sink = sink

    def detach(self) -> None:
        """Stop delivering to the sink (and drop it: it usually closes over this response)."""
        self._proto.sink = None

    def pause(self) -> None:
        if self._proto.transport is not None:
            self._proto.transport.pause_reading()

    def resume(self) -> None:
        if self._proto.transport is not None and not self._proto.transport.is_closing():
            self._proto.transport.resume_reading()

    async def wait_done(self) -> str:
        """ok | broken | timeout | error:...; timeout = no bytes for the configured time."""
        p = self._proto
        if p.done.done():            # whole body already here (one read): no timer, no extra loop turn
            return p.done.result()
        timeout = self._timeout
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(p.done), timeout)
            except asyncio.TimeoutError:
                idle = (time.monotonic_ns() - p.last_ns) / 1e9
                if idle >= self._timeout:
                    return "timeout"
                timeout = self._timeout - idle

    async def read(self) -> bytes:
        chunks: list[bytes] = []
        self.attach(lambda data, t: chunks.append(data))
        result = await self.wait_done()
        if result == "timeout":
            raise asyncio.TimeoutError()
        if result != "ok":
            raise aiohttp.ClientPayloadError(f"backend response broken ({result})")
        return b"".join(chunks)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        p = self._proto
        p.sink = None            # the sink closes over this response: no reference cycle is left
        if p.done.done() and p.done.result() == "ok" and p.keep_alive and p.transport is not None \
                and not p.transport.is_closing():
            self._pool.put(p)
        else:
            self.close()

    def close(self) -> None:
        self._released = True
        self._proto.sink = None
        if self._proto.transport is not None:
            self._proto.transport.abort()


class RelayPool:
    """Keep-alive connections to one backend (host, port), plain http."""

    def __init__(self, host: str, port: int, connect_timeout: float, read_timeout: float) -> None:
        self.host, self.port = host, port
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: list[_BackendProtocol] = []
        self._key = ConnectionKey(host, port, False, True, None, None, None)

    def put(self, proto: _BackendProtocol) -> None:
        if len(self._idle) < 256:
            proto.idle_since = time.monotonic()
            self._idle.append(proto)
        elif proto.transport is not None:
            proto.transport.close()

    def close(self) -> None:
        for p in self._idle:
            if p.transport is not None:
                p.transport.close()
        self._idle.clear()

    async def _connect(self) -> _BackendProtocol:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: _BackendProtocol(loop), self.host, self.port),
                self.connect_timeout)
        except asyncio.TimeoutError:
            raise aiohttp.ClientConnectorError(self._key, OSError("connect timeout")) from None
        except OSError as exc:
            raise aiohttp.ClientConnectorError(self._key, exc) from None
        return proto

    async def request(self, head: bytes, body: bytes, head_timeout: float | None = None) -> RawResponse:
        """Send one request; returns once the response head arrived (within ``head_timeout``
        seconds, default the read timeout: else ``asyncio.TimeoutError``)."""
        loop = asyncio.get_running_loop()
        for attempt in (0, 1):
            reused = False
            proto: _BackendProtocol | None = None
            now = time.monotonic()
            while self._idle:
                cand = self._idle.pop()        # the most recently used first
                if cand.transport is None or cand.transport.is_closing():
                    continue
                if now - cand.idle_since > MAX_IDLE_REUSE_SECONDS:
                    cand.transport.close()     # the rest of the pool is older still
                    for old in self._idle:
                        if old.transport is not None:
                            old.transport.close()
                    self._idle.clear()
                    break
                proto, reused = cand, True
                break
            if proto is None:
                proto = await self._connect()
            else:
                # Fresh per-request state on a kept-alive connection.
                fresh = _BackendProtocol(loop)
                fresh.transport = proto.transport
                proto.transport.set_protocol(fresh)  # type: ignore[union-attr]
                proto = fresh
            assert proto.transport is not None
            proto.transport.write(head + body)
            # await the head future itself (a timer fails it on timeout): the task wakes in the
            # loop turn the head arrives, not after the extra turns of wait_for + shield
            timer = loop.call_later(head_timeout or self.read_timeout, _fail_head_on_timeout,
                                    proto.head_future)
            try:
                await proto.head_future
            except aiohttp.ServerDisconnectedError:
                if reused and not proto.got_bytes and attempt == 0:
                    continue          # the kept-alive connection had gone stale: once more, fresh
                raise
            except BaseException:
                proto.transport.abort()
                raise
            finally:
                timer.cancel()
            return RawResponse(self, proto, self.read_timeout)
        raise aiohttp.ServerDisconnectedError()


def _fail_head_on_timeout(fut: "asyncio.Future[None]") -> None:
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError())


def request_head(method: str, path_qs: str, host_header: str, headers: CIMultiDict[str], body_len: int) -> bytes:
    lines = [f"{method} {path_qs} HTTP/1.1", f"Host: {host_header}"]
    for k, v in headers.items():
        kl = k.lower()
        if kl in ("host", "content-length", "transfer-encoding", "connection"):
            continue
        if "\r" in v or "\n" in v or "\r" in k or "\n" in k:
            continue
        lines.append(f"{k}: {v}")
    lines.append(f"Content-Length: {body_len}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
