"""A lean HTTP/1.1 client for streamed generation responses (the proxy's hot path).

aiohttp's client wakes a task for every chunk the backend sends; with one SSE event per token that
is the largest per-token cost of the proxy (docs/benchmarks.md, Proxy overhead). Here the backend
connection is an ``asyncio.Protocol``: each chunk is de-chunked and handed to a synchronous sink
straight from ``data_received`` (SSE framing, token accounting and the write to the client happen
in that callback), with no task switch per event. Used for streaming requests over plain http;
everything else goes through aiohttp. The response object mimics what the proxy core uses of
``aiohttp.ClientResponse`` (status, reason, headers, read, release, close).
"""
from __future__ import annotations

import asyncio
import socket
import time
from typing import Callable

import aiohttp
from aiohttp.client_reqrep import ConnectionKey
from multidict import CIMultiDict

Sink = Callable[[bytes, int], None]

_HIGH_WATER = 256 * 1024
# A kept-alive backend connection idle longer than this is closed instead of reused: servers close
# idle connections after their own keep-alive timeout (uvicorn: 5 s), and a request sent on one
# that the server is closing at that moment fails before any response byte (see RelayPool.request).
MAX_IDLE_REUSE_SECONDS = 4.0


class _BackendProtocol(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.in_head = True
        self.got_bytes = False
        self.head_future: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[str] = loop.create_future()   # ok | broken | error:<msg>
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.mode = "close"          # chunked | length | close | none
        self.remaining = 0
        self.chunk_left = -1         # >0 data bytes left; -1 size line; -2 CRLF; -3 trailers
        self.cbuf = b""
        self.sink: Sink | None = None
        self.pending: list[bytes] = []
        self.keep_alive = True
        self.last_ns = time.monotonic_ns()
        self.head_ns = 0             # arrival of the response head (monotonic ns)
        self.idle_since = 0.0        # time.monotonic() when it went back to the pool

    # -- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        self.last_ns = time.monotonic_ns()
        self.got_bytes = True
        try:
            if self.in_head:
                if not self.head:            # empty lines before a status line are ignored
                    data = data.lstrip(b"\r\n")   # (RFC 9112 §2.2)
                self.head += data
                while True:
                    end = self.head.find(b"\r\n\r\n")
                    if end < 0:
                        if len(self.head) > 65536:
                            raise ValueError("response head too large")
                        return
                    rest = bytes(self.head[end + 4:])
                    self._parse_head(bytes(self.head[:end]))
                    if not (100 <= self.status < 200 and self.status != 101):
                        break
                    # an interim response (100 Continue, 103 Early Hints) is not the answer: the
                    # final head follows on the same connection (RFC 9110 §15.2)
                    self._reset_head()
                    self.head += rest
                self.head_ns = self.last_ns
                self.in_head = False
                if not self.head_future.done():
                    self.head_future.set_result(None)
                if self.mode == "none":
                    if rest:
                        self.keep_alive = False    # bytes after a body-less response: never reuse
                    self._finish("ok")
                    return
                if rest:
                    self._body(rest)
            elif not self.done.done():
                self._body(data)
            else:
                # bytes after the end of the response: the connection's framing is not what we
                # think, so it must never carry another client's request
                raise ValueError("bytes after the end of the response")
        except Exception as exc:  # noqa: BLE001 - a protocol callback must not raise
            self._fail(f"error:{type(exc).__name__}: {exc}")
            if self.transport is not None:
                self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head_future.done():
            self.head_future.set_exception(aiohttp.ServerDisconnectedError())
        if self.mode == "close" and not self.in_head:
            self._finish("ok")
        else:
            self._finish("broken")

    # -- parsing ------------------------------------------------------------------------------
    def _reset_head(self) -> None:
        """Forget an interim (1xx) head: wait for the next one."""
        self.head = bytearray()
        self.status, self.reason = 0, ""
        self.headers = CIMultiDict()
        self.mode = "close"
        self.keep_alive = True

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ValueError(f"bad status line {lines[0][:60]!r}")
        self.status = int(parts[1])
        self.reason = parts[2] if len(parts) > 2 else ""
        for line in lines[1:]:
            k, sep, v = line.partition(":")
            if sep:
                self.headers.add(k.strip(), v.strip())
        conn = self.headers.get("Connection", "").lower()
        if parts[0] == "HTTP/1.0" and "keep-alive" not in conn or "close" in conn:
            self.keep_alive = False
        te = self.headers.get("Transfer-Encoding", "").lower()
        if self.status == 101:       # switching protocols: the connection is no longer HTTP
            self.mode = "none"
            self.keep_alive = False
        elif self.status in (204, 304) or 100 <= self.status < 200:
            self.mode = "none"
        elif "chunked" in te:
            self.mode = "chunked"
        elif "Content-Length" in self.headers:
            self.mode = "length"
            self.remaining = int(self.headers["Content-Length"])
            if self.remaining < 0:
                raise ValueError("negative Content-Length")
            if self.remaining == 0:
                self.mode = "none"
        else:
            self.mode = "close"
            self.keep_alive = False

    def _deliver(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink(data, self.last_ns)
        else:
            self.pending.append(data)

    def _body(self, data: bytes) -> None:
        if self.mode == "length":
            if len(data) >= self.remaining:
                if len(data) > self.remaining:
                    self.keep_alive = False      # more than Content-Length: never reuse
                data = data[: self.remaining]
                self.remaining = 0
                self._deliver(data)
                self._finish("ok")
            else:
                self.remaining -= len(data)
                self._deliver(data)
            return
        if self.mode == "close":
            self._deliver(data)
            return
        buf = self.cbuf + data if self.cbuf else data
        pos, n, out = 0, len(buf), []
        while pos < n or self.chunk_left == 0:
            left = self.chunk_left
            if left > 0:
                take = min(left, n - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self.chunk_left = left - take if left - take else -2
            elif left == -2:
                if n - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise ValueError("bad chunk terminator")
                pos += 2
                self.chunk_left = -1
            elif left == -1:
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    break
                size = int(buf[pos:i].split(b";", 1)[0].strip(), 16)
                pos = i + 2
                self.chunk_left = size if size else -3
            else:   # -3: trailers until an empty line
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    break
                line = buf[pos:i]
                pos = i + 2
                if not line:
                    self.cbuf = b""
                    if pos < n:
                        self.keep_alive = False  # bytes after the last chunk: never reuse
                    if out:
                        self._deliver(out[0] if len(out) == 1 else b"".join(out))
                    self._finish("ok")
                    return
        self.cbuf = buf[pos:]
        if out:
            self._deliver(out[0] if len(out) == 1 else b"".join(out))

    def _finish(self, result: str) -> None:
        if not self.done.done():
            self.done.set_result(result)

    def _fail(self, result: str) -> None:
        self.keep_alive = False
        if not self.head_future.done():
            self.head_future.set_exception(aiohttp.ServerDisconnectedError(result))
        self._finish(result)


class RawResponse:
    """What the proxy core needs of a backend response, over :class:`_BackendProtocol`."""

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
