"""The generation routes' backend side over the lean HTTP/1.1 client (:class:`RawRelay`).

The hot path for plain http backends (``proxy.stream_relay: raw``, the default): every backend
chunk of a stream is framed, accounted and written to the client inside the backend protocol's
callback (``raw_http``), with no task switch per event; the client's write buffer is bounded
(:data:`RELAY_HIGH_WATER`: above it the backend is not read). Owns: the request head, the
connection pool's lifetime, the stream's callback and its outcome. Must not: parse HTTP
(``raw_http``), pool connections itself (``raw_pool``), answer failures before the response head
(``forward``).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from edge_proxy.proxy.errors import Api, error_event, failure_message
from edge_proxy.proxy.hooks import RequestRecord
from edge_proxy.proxy.raw_pool import RawResponse, RelayPool, request_head
from edge_proxy.proxy.relay import (
    BackendResponse, StreamAccounting, client_gone, mark_terminated, relay_chunk, stream_rest)
from edge_proxy.proxy.sse import EventTooLarge, SSESplitter

RELAY_HIGH_WATER = 256 * 1024     # client write buffer above this: stop reading the backend


class RawRelay:
    """:class:`~edge_proxy.proxy.relay.Relay` to the plain-http backend at ``backend_url``."""

    name = "raw"

    def __init__(self, backend_url: str, connect_timeout_seconds: float,
                 upstream_timeout_seconds: float) -> None:
        u = URL(backend_url)
        assert u.scheme == "http" and u.host
        self.backend_url = backend_url
        self.upstream_timeout_seconds = upstream_timeout_seconds
        self.pool = RelayPool(u.host, u.port or 80, connect_timeout_seconds, upstream_timeout_seconds)
        self._host = u.raw_authority
        self._prefix = u.raw_path.rstrip("/")     # backend URL with a path prefix

    async def send(self, path_qs: str, body: bytes, headers: CIMultiDict[str],
                   head_timeout: float) -> BackendResponse:
        head = request_head("POST", self._prefix + path_qs, self._host, headers, len(body))
        return await self.pool.request(head, body, head_timeout)

    async def close(self) -> None:
        self.pool.close()

    async def stream(self, request: web.Request, rec: RequestRecord, resp: BackendResponse,
                     out: web.StreamResponse, acct: StreamAccounting, splitter: SSESplitter) -> None:
        assert isinstance(resp, RawResponse)
        api: Api = rec.api  # type: ignore[assignment]
        tr = request.transport
        # no closure here refers to itself (state["resume"] is dropped at the end): a request's
        # objects are freed by reference counting, not left for the cyclic GC (whose full
        # collections stalled the loop, docs/benchmarks.md Proxy overhead)
        state: dict[str, Any] = {"client_gone": False, "paused": False}
        loop = asyncio.get_running_loop()

        def resume_when_drained() -> None:
            if tr is None or tr.is_closing():
                state["paused"] = False
                return
            if tr.get_write_buffer_size() > RELAY_HIGH_WATER // 4:
                again = state.get("resume")
                if again is not None:
                    loop.call_later(0.005, again)
                return
            state["paused"] = False
            resp.resume()

        def on_data(chunk: bytes, t: int) -> None:
            if state["client_gone"] or "too_large" in state:
                return
            try:
                data = relay_chunk(splitter, acct, chunk, t)
            except EventTooLarge as exc:     # stop reading the backend; the error event follows
                state["too_large"] = exc
                resp.close()
                data = exc.kept
            if data is None:
                return
            if tr is None or tr.is_closing():
                state["client_gone"] = True
                resp.close()
                return
            tr.write(b"%x\r\n%b\r\n" % (len(data), data))
            if acct.terminated:
                mark_terminated(rec, acct)
            if not state["paused"] and tr.get_write_buffer_size() > RELAY_HIGH_WATER:
                state["paused"] = True
                resp.pause()
                loop.call_later(0.005, resume_when_drained)

        state["resume"] = resume_when_drained
        try:
            resp.attach(on_data)
            result = await resp.wait_done()
            if state["client_gone"]:
                raise ConnectionResetError("client went away")
            if acct.terminated and rec.outcome is not None:
                # the client has the whole answer; a backend that then stalls or drops its
                # connection changes nothing for it (that connection is not reused)
                pass
            else:
                rest = stream_rest(acct, splitter)
                if rest:
                    await out.write(rest)
            if rec.outcome is not None:
                pass
            elif "too_large" in state:
                rec.outcome = "error"
                rec.error_type = "stream_broken"
                await out.write(error_event(api, "stream_broken", str(state["too_large"])))
            elif result == "ok":
                mark_terminated(rec, acct)
            elif result == "timeout":
                rec.outcome = "timeout"
                rec.error_type = "timeout"
                await out.write(error_event(
                    api, "timeout", f"backend sent nothing for {self.upstream_timeout_seconds:g} s"))
            else:
                rec.outcome = "error"
                rec.error_type = "stream_broken"
                await out.write(error_event(api, "stream_broken", failure_message(
                    result, self.backend_url, self.upstream_timeout_seconds, acct.counted)))
            await out.write_eof()
        except ConnectionResetError:
            client_gone(rec)             # after the terminator the outcome is final (ok)
            raise asyncio.CancelledError() from None
        finally:
            state.pop("resume", None)
            resp.detach()
            acct.finish()
            rec.t_end_ns = time.monotonic_ns()
