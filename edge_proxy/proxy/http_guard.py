"""The HTTP server's connections: read deadlines for request heads and bodies, and protocol-level
errors answered as one JSON body and logged as one rate-limited line.

aiohttp's server has no deadline for a request head that trickles in (slowloris) and answers its
own protocol errors (a header line too long, a bad ``Content-Length``, a malformed request line)
with ``text/plain`` and a multi-line traceback in the log for each one. Here:

- A request head must be complete ``header_timeout`` seconds after the connection opened, or
  after the first byte of the next request on a kept-alive connection; otherwise the client gets
  408 (when it sent anything) and the connection is closed. An idle kept-alive connection is
  aiohttp's ``keepalive_timeout``'s business.
- A request body must be complete ``body_timeout`` seconds after its head (plus one second: the
  request handlers enforce the same bound themselves and answer 408 in the API's format; this is
  the backstop for routes that stream the body): otherwise the connection is closed.
- A protocol error is answered in the format ``api_for_path`` picks (OpenAI error JSON, TGI
  ``{"error", "error_type"}``; the TGI-shaped generic body when the path could not be parsed)
  and logged as one line, at most ``log_burst`` lines per ``log_interval`` seconds (then one
  line saying how many were left out). A handler's unexpected exception (500) is still logged
  with its traceback, as a bug, under the same rate limit.

Use :func:`guarded_runner` instead of ``web.AppRunner``; any aiohttp app can (the model server too).
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from edge_proxy.proxy.errors import Api, error_body

log = logging.getLogger("edge_proxy")

BODY_BACKSTOP_GRACE_SECONDS = 1.0
LINGER_SECONDS = 1.0          # after a 408 for a late head: read and drop, then close
_QUOTED_BYTES = re.compile(r"\s*:?\s*(?:b?['\"]|bytearray\()")


class RateLimitedLog:
    """At most ``burst`` lines per ``interval`` seconds; the count of the lines left out is
    logged with the first line of the next interval. One per server (no global state)."""

    def __init__(self, logger: logging.Logger, burst: int = 5, interval: float = 10.0) -> None:
        self.logger, self.burst, self.interval = logger, burst, interval
        self._window_start = -1e18
        self._lines = 0
        self._dropped = 0

    def log(self, level: int, msg: str, *args: Any, exc_info: Any = None) -> bool:
        """Log one line (True) or count it as left out (False)."""
        now = time.monotonic()
        if now - self._window_start >= self.interval:
            if self._dropped:
                self.logger.log(level, "%d similar lines left out in the last %.0f s",
                                self._dropped, now - self._window_start)
            self._window_start, self._lines, self._dropped = now, 0, 0
        if self._lines >= self.burst:
            self._dropped += 1
            return False
        self._lines += 1
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True


@dataclass
class Guard:
    header_timeout: float | None = 10.0      # seconds; None or <= 0: no deadline
    body_timeout: float | None = 60.0
    api_for_path: Callable[[str], Api] = lambda path: "other"
    log_burst: int = 5
    log_interval: float = 10.0

    def __post_init__(self) -> None:
        self.errors = RateLimitedLog(log, self.log_burst, self.log_interval)


def _one_line(exc: BaseException | None, limit: int = 160) -> str:
    if exc is None:
        return "error"
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    # never echo the client's bytes (aiohttp quotes the offending line: headers may hold secrets)
    text = _QUOTED_BYTES.split(" ".join(str(text).split()), 1)[0]
    return f"{type(exc).__name__}: {text[:limit]}"


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection handler with the deadlines and error answers of :class:`Guard`."""

    def __init__(self, *args: Any, guard: Guard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard = guard
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._payload: Any = None            # the body stream of the last request head
        self._got_bytes = False
        self._lingering = False

    # -- deadlines ---------------------------------------------------------------------------------
    def _arm_head(self) -> None:
        t = self._guard.header_timeout
        if t and t > 0 and self._head_timer is None:
            self._head_timer = self._loop.call_later(t, self._head_late, self._request_count)

    def _head_late(self, count: int) -> None:
        self._head_timer = None
        if self._request_count != count or self._force_close or self.transport is None:
            return
        if self._request_in_progress or self._messages:
            # a client pipelining behind a request still being answered: never write into that
            # response; the keep-alive timeout bounds the connection once it is done
            return
        if not self._got_bytes:
            self.force_close()
            return
        body = error_body("other", "client_timeout", "request head not complete in "
                          f"{self._guard.header_timeout:g} s", 408)
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                             b"Connection: close\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        # lingering close: what the client still sends is read and dropped for a moment, so the
        # close is a FIN after the 408 rather than a reset that would discard it unread
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._lingering = True
        self._loop.call_later(LINGER_SECONDS, self.force_close)

    def _body_late(self, payload: Any) -> None:
        self._body_timer = None
        if payload is self._payload and not payload.is_eof() and not self._force_close:
            self._guard.errors.log(logging.INFO, "request body not complete in %g s: connection closed",
                                   self._guard.body_timeout)
            self.force_close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        heads = data and not self._upgraded and self._payload_parser is None
        # bytes of a request head (not of the body being read)?
        head_bytes = heads and (self._payload is None or self._payload.is_eof())
        if heads:
            self._got_bytes = True
        count = self._request_count
        super().data_received(data)
        if self._request_count == count:
            if head_bytes:
                self._arm_head()              # a head begun, not complete: its deadline runs
        else:                                 # a head (or a parse error) arrived
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            payload = self._messages[-1][1] if self._messages else None
            self._payload = payload
            t = self._guard.body_timeout
            if payload is not None and not payload.is_eof() and t and t > 0:
                if self._body_timer is not None:
                    self._body_timer.cancel()
                self._body_timer = self._loop.call_later(t + BODY_BACKSTOP_GRACE_SECONDS,
                                                         self._body_late, payload)

    def connection_lost(self, exc: BaseException | None) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None
        self._payload = None
        super().connection_lost(exc)

    # -- errors ------------------------------------------------------------------------------------
    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        protocol_error = isinstance(exc, HttpProcessingError)
        if status >= 500 and not protocol_error:
            self._guard.errors.log(logging.ERROR, "%d handling %s %s: %s", status, request.method,
                                   request.path, _one_line(exc), exc_info=exc)
        else:
            self._guard.errors.log(logging.INFO, "%d from %s: %s", status, request.remote,
                                   _one_line(exc) if exc is not None else (message or ""))
        if request.writer.output_size > 0:
            raise ConnectionError("response already started: cannot send an error response")
        # the path of a request whose head did not parse is unknown: the generic body
        api: Api = "other" if protocol_error else self._guard.api_for_path(request.path)
        if status >= 500:
            kind, text = "internal", "internal error in the proxy"
        else:
            kind, text = "bad_request", _one_line(exc) if exc is not None else (message or "bad request")
        resp = web.Response(status=status, body=error_body(api, kind, text, status),
                            content_type="application/json")
        resp.force_close()
        return resp


class _GuardedServer(web.Server):
    guard: Guard

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, guard=self.guard, **self._kwargs)


class _GuardedAppRunner(web.AppRunner):
    def __init__(self, app: web.Application, guard: Guard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._guard = guard

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _GuardedServer      # aiohttp has no hook for the handler class
        server.guard = self._guard  # type: ignore[attr-defined]
        return server


def guarded_runner(app: web.Application, guard: Guard, **kwargs: Any) -> web.AppRunner:
    """A ``web.AppRunner`` whose connections follow ``guard`` (deadlines, error answers)."""
    return _GuardedAppRunner(app, guard, **kwargs)
