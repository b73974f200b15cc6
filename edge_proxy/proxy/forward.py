"""The generation routes (``POST /v1/chat/completions``, ``/v1/completions``, ``/generate``,
``/generate_stream``, ``/``): one request's way from the client to the backend and back.

Owns: reading and checking the body (400/408/413 in the API's format), the request's record and
labels, the cold-start gate (hold, and one retry after a refused connect or a 503), the headers
sent to the backend, answers for failures before the response head (502/503/504), the whole
(non-streamed) answer and the set-up of a stream (the relay moves its bytes: ``relay``). Must
not: move stream bytes (``relay_raw`` / ``relay_aiohttp``), call observers other than through
``bookkeeping``, or keep state between requests (the core does: ``app.ProxyCore``).
"""
from __future__ import annotations

import asyncio
import secrets
import time
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from edge_proxy.coldstart.factory import cold_start_headers
from edge_proxy.proxy import json_input
from edge_proxy.proxy.errors import Api, error_response, is_connect_failure
from edge_proxy.proxy.fd_exhaustion import ERROR_TYPE as FD_ERROR_TYPE, STATUS as FD_STATUS, is_fd_exhaustion
from edge_proxy.proxy.forward_routes import RouteSpec
from edge_proxy.proxy.headers import request_headers, response_headers
from edge_proxy.proxy.hooks import GateRejected, RequestRecord
from edge_proxy.proxy.relay import BackendResponse, done_with
from edge_proxy.proxy.request_body import read_generation
from edge_proxy.proxy.sse import SSESplitter
from edge_proxy.proxy.token_accounting import OpenAIStream, TGIStream, apply_response_headers

if TYPE_CHECKING:
    from edge_proxy.proxy.app import ProxyCore

CONTENT_LOG_MAX_CHARS = 4096
REQUEST_ID_HEADER = "x-edge-request-id"   # on every instrumented response: the id for /edge/feedback


def tag(out: web.StreamResponse, rec: RequestRecord) -> None:
    """The request's ids on its response: ours (the key for /edge/feedback) and the client's
    own x-request-id echoed back (unless the backend's response already carries one)."""
    out.headers[REQUEST_ID_HEADER] = rec.request_id
    if rec.client_request_id is not None and "x-request-id" not in out.headers:
        out.headers["x-request-id"] = rec.client_request_id


def _rejected(rec: RequestRecord, rej: GateRejected) -> web.Response:
    """The gate would not let the request through: 503 (with Retry-After when the gate says)."""
    rec.outcome, rec.error_type, rec.status = "rejected", rej.reason, 503
    out = error_response(rec.api, 503, rej.reason, rej.message)  # type: ignore[arg-type]
    if rej.retry_after_seconds is not None:
        out.headers["Retry-After"] = str(rej.retry_after_seconds)
    return out


def _reject(rec: RequestRecord, status: int, error_type: str, msg: str) -> web.Response:
    rec.status = status
    rec.outcome = "error"
    rec.error_type = error_type
    out = error_response(rec.api, status, error_type, msg)  # type: ignore[arg-type]
    tag(out, rec)
    return out


class Forwarder:
    """The generation routes of ``core`` (its settings, backend, relay, gate and bookkeeping)."""

    def __init__(self, core: "ProxyCore") -> None:
        self.core = core
        self.ps = core.ps
        self.book = core.book

    async def generation(self, request: web.Request, spec: RouteSpec, t0: int) -> web.StreamResponse:
        core, ps, book = self.core, self.ps, self.book
        # the proxy's own id keys everything (ledger, feedback): unguessable, one per request;
        # the client's x-request-id is only a label (logs, spans) and is echoed back
        rid = request.headers.get("x-request-id")
        rec = RequestRecord(request_id=secrets.token_hex(16),
                            client_request_id=rid if rid and len(rid) <= 128 else None,
                            route=request.path, api=spec.api, operation=spec.operation,
                            model=core.model_label(None), t_received_ns=t0)
        core.live[id(rec)] = (rec, request)
        started = False
        counted = False          # in flight only once its body is complete
        defer_end = False
        whole: list[tuple[bytes, int]] = []     # a whole 200 body, accounted after it is written
        try:
            try:
                if request.content.is_eof():     # the whole body came with the head: no timer
                    body = await request.read()
                else:
                    async with asyncio.timeout(ps.request_body_timeout_seconds or None):
                        body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return _reject(rec, 413, "too_large", f"request body exceeds {ps.max_body_bytes} bytes")
            except TimeoutError:
                late = _reject(rec, 408, "client_timeout", "request body not complete in "
                               f"{ps.request_body_timeout_seconds:g} s")
                late.force_close()           # the rest of the body is not waited for
                return late
            core.metrics.in_flight.inc()
            counted = True
            try:
                obj = json_input.loads(body)
            except ValueError:
                return _reject(rec, 400, "bad_request", "request body is not valid JSON")
            if not isinstance(obj, dict):
                return _reject(rec, 400, "bad_request", "request body must be a JSON object")
            body, strip_usage, requested_model = read_generation(rec, spec, body, obj, core.backend.kind)
            rec.model = core.model_label(requested_model)
            if rec.model == "unknown" and isinstance(requested_model, str):
                rec.extra["requested_model"] = requested_model[:256]   # relabel after a hold
            if rec.model != "unknown":
                core.metrics.touch(rec.model, rec.route, rec.stream)
            if ps.log_content:
                rec.extra["content"] = body[:CONTENT_LOG_MAX_CHARS].decode("utf-8", "replace")

            started = True
            book.start(rec)
            if core.tracing is not None:
                core.tracing.start(rec, requested_model if isinstance(requested_model, str) else None,
                                   request.headers)
            gate = core.gate
            if gate is not None:
                rec.extra["request_bytes"] = len(body)      # held bytes are bounded (coldstart.max_held_bytes)
                try:
                    await gate.acquire(rec)
                except GateRejected as exc:
                    out = _rejected(rec, exc)
                    tag(out, rec)
                    return out
                await core.relabel_after_hold(rec, requested_model)
            out = await self._forward(request, rec, body, strip_usage, whole)
            # a whole (non-streamed) response is written after this returns: the end-of-request
            # observer work runs after the write (next loop iteration), off the response's path
            defer_end = not out.prepared
            if defer_end:       # (a streamed response got the header before it started)
                tag(out, rec)
            return out
        except asyncio.CancelledError:
            if rec.outcome is None:
                rec.outcome = "cancelled"
                rec.error_type = "client_disconnect"
                rec.status = rec.status or 499
            raise
        finally:
            core.live.pop(id(rec), None)
            if rec.outcome is None:
                rec.outcome = "error"
                rec.error_type = rec.error_type or "internal"
            if rec.t_end_ns is None:
                rec.t_end_ns = time.monotonic_ns()
            if defer_end:
                asyncio.get_running_loop().call_soon(book.account_whole_then_end, rec, started,
                                                     whole[0] if whole else None)
            else:
                book.end(rec, started, counted)

    def _upstream_failure(self, rec: RequestRecord, exc: BaseException) -> web.Response:
        """Map a failure before response headers to 502/504 in the client's format."""
        api: Api = rec.api  # type: ignore[assignment]
        if is_fd_exhaustion(exc):
            rec.error_type, rec.status, rec.outcome = FD_ERROR_TYPE, FD_STATUS, "error"
            return self.core.fd_exhaustion.response(api, exc)
        if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)) \
                and not is_connect_failure(exc):
            rec.error_type = "timeout"
            rec.status = 504
            rec.outcome = "timeout"
            return error_response(api, 504, "timeout", "backend did not answer in time")
        if is_connect_failure(exc):
            gate = self.core.gate
            if gate is not None:
                gate.notify_backend_failure()
            rec.error_type = "connect"
        else:
            rec.error_type = "stream_broken"
        msg = self.core.failure_message(exc)
        rec.status = 502
        rec.outcome = "error"
        return error_response(api, 502, rec.error_type, msg)

    async def _forward(self, request: web.Request, rec: RequestRecord, body: bytes,
                       strip_usage: bool, whole: list[tuple[bytes, int]]) -> web.StreamResponse:
        core = self.core
        relay = core.relay
        assert relay is not None
        headers = request_headers(request.headers, request.remote)
        if "x-request-id" not in headers:
            headers["x-request-id"] = rec.request_id     # the backend's logs can name it too
        headers["Accept-Encoding"] = "identity"
        if "Content-Type" not in headers:
            headers["Content-Type"] = "application/json"
        if core.tracing is not None:
            carrier: dict[str, str] = {}
            core.tracing.inject(rec, carrier)
            headers.update(carrier)
        # a stream's head is due within first_byte_timeout_seconds; a whole answer's head comes
        # with the answer, so it may take upstream_timeout_seconds
        head_timeout = core.first_byte_timeout() if rec.stream else self.ps.upstream_timeout_seconds
        gate = core.gate
        resp: BackendResponse | None = None
        for attempt in (0, 1):
            rec.t_forwarded_ns = time.monotonic_ns()
            try:
                resp = await relay.send(request.path_qs, body, headers, head_timeout)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                if gate is None or attempt or not is_connect_failure(exc) or is_fd_exhaustion(exc):
                    rec.t_end_ns = time.monotonic_ns()
                    return self._upstream_failure(rec, exc)
                resp = None
            if gate is not None and not attempt and (resp is None or resp.status == 503):
                # Hold mode (cold start): the backend refused the request (down, loading), so
                # nothing ran there: hold it until the backend is ready, then send it once more.
                if resp is not None:
                    resp.release()
                gate.notify_backend_failure()
                try:
                    await gate.acquire(rec)
                except GateRejected as rej:
                    rec.t_end_ns = time.monotonic_ns()
                    return _rejected(rec, rej)
                await core.relabel_after_hold(rec, rec.extra.get("requested_model"))
                continue
            break
        assert resp is not None
        rec.t_backend_headers_ns = getattr(resp, "head_ns", 0) or time.monotonic_ns()
        complete = False
        try:
            apply_response_headers(rec, resp.headers)
            ctype = resp.headers.get("Content-Type", "")
            if resp.status == 200 and rec.stream and ctype.startswith("text/event-stream"):
                out = await self._stream(request, rec, resp, strip_usage)
            else:
                out = await self._whole(rec, resp, whole)
            complete = True
            return out
        finally:
            done_with(resp, complete)

    async def _whole(self, rec: RequestRecord, resp: BackendResponse,
                     whole: list[tuple[bytes, int]]) -> web.StreamResponse:
        """Non-streaming (or error) response: read it and answer in one piece. A 200 body goes
        into ``whole`` with its arrival time: its tokens are accounted right after the response
        is written (``Bookkeeping.account_whole_then_end``), not on the response's path."""
        try:
            data = await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            rec.t_end_ns = time.monotonic_ns()
            return self._upstream_failure(rec, exc)
        rec.status = resp.status
        if resp.status == 200:
            if self.book.header_calls:
                # a header computed from the request's state wants its tokens counted first
                self.book.account_whole(rec, data, time.monotonic_ns())
            else:
                whole.append((data, time.monotonic_ns()))
            rec.outcome = "ok"
        elif resp.status < 400:
            rec.outcome = "ok"          # e.g. a redirect: passed to the client, never followed
        else:
            rec.outcome = "error"
            rec.error_type = "upstream_status" if resp.status >= 500 else "bad_request"
        out = web.Response(status=resp.status, headers=response_headers(resp.headers), body=data)
        if rec.cold_start:
            out.headers.update(cold_start_headers(rec))
        for f in self.book.header_calls:   # optional extra headers (energy: x-edge-energy-joules, provisional)
            try:
                out.headers.update(f(rec))
            except Exception:  # noqa: BLE001 - never fail a response for a header
                pass
        rec.t_end_ns = time.monotonic_ns()
        return out

    async def _stream(self, request: web.Request, rec: RequestRecord, resp: BackendResponse,
                      strip_usage: bool) -> web.StreamResponse:
        """A streamed (SSE) 200: the head to the client now, then the relay moves the body."""
        relay = self.core.relay
        assert relay is not None
        rec.status = resp.status
        out = web.StreamResponse(status=resp.status, headers=response_headers(resp.headers))
        tag(out, rec)
        if rec.cold_start:
            out.headers.update(cold_start_headers(rec))
        await out.prepare(request)
        tokens = self.book.tokens
        sink = lambda n, t: tokens(rec, n, t)  # noqa: E731
        acct: OpenAIStream | TGIStream = (OpenAIStream(rec, strip_usage, sink) if rec.api == "openai"
                                          else TGIStream(rec, sink))
        await relay.stream(request, rec, resp, out, acct, SSESplitter(self.ps.max_sse_event_bytes))
        return out
