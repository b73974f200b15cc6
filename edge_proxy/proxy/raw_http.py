"""The lean relay's backend connection: an HTTP/1.1 response parser as an ``asyncio.Protocol``.

aiohttp's client wakes a task for every chunk the backend sends; with one SSE event per token that
is the largest per-token cost of the proxy (docs/benchmarks.md, Proxy overhead). Here each chunk is
de-chunked and handed to a synchronous sink straight from ``data_received`` (SSE framing, token
accounting and the write to the client happen in that callback), with no task switch per event.

Owns: parsing one response (status line, headers, interim 1xx heads, Content-Length / chunked /
close framing) and whether the connection may be reused. Must not: pool connections
(``raw_pool``), know about SSE, tokens or the client (``relay_raw``).
"""
from __future__ import annotations

import asyncio
import socket
import time
from typing import Callable

import aiohttp
from multidict import CIMultiDict

Sink = Callable[[bytes, int], None]


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

