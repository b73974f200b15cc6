"""The proxy core: per-request timeline, forwarding, SSE pass-through, faults.

Instrumented routes (generation): ``POST /v1/chat/completions``, ``/v1/completions`` (OpenAI),
``/generate``, ``/generate_stream``, ``/`` (TGI). Metadata routes ``GET /v1/models``, ``/info``,
``/health`` are forwarded and counted. Every other route that ``proxy.forward_routes`` allows passes
through untouched; the rest get 404 (``edge_proxy.proxy.forward_routes``).

Observer calls per generation request (see ``edge_proxy.proxy.hooks``): ``on_request_start`` ->
``on_tokens`` -> ``on_request_end`` -> ``await finalize`` (background, bounded) ->
``on_request_final`` (other components first, then the core outputs: metrics, access log, span).
A request rejected before forwarding (bad JSON, too large) only reaches the core outputs.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp
from aiohttp import web
from yarl import URL

from edge_proxy.config import Settings
from edge_proxy.proxy.errors import Api, api_for_path, error_event, error_response, failure_message
from edge_proxy.proxy.fd_exhaustion import ERROR_TYPE as FD_ERROR_TYPE, STATUS as FD_STATUS, FdExhaustion, is_fd_exhaustion
from edge_proxy.proxy.headers import request_headers, response_headers
from edge_proxy.coldstart.factory import cold_start_headers
from edge_proxy.proxy import json_input
from edge_proxy.proxy.forward_routes import RouteAllowList
from edge_proxy.proxy.hooks import BackendGate, BaseObserver, GateRejected, RequestObserver, RequestRecord
from edge_proxy.metrics import ProxyMetrics
from edge_proxy.proxy.relay import RawResponse, RelayPool, request_head
from edge_proxy.proxy.request_flags import backend_bool
from edge_proxy.proxy.sse import EventTooLarge, SSESplitter, event_data
from edge_proxy.proxy.token_accounting import (
    OpenAIStream, TGIStream, account_openai_body, account_tgi_body, apply_response_headers)
from edge_proxy.tracing import Tracing
from edge_proxy.proxy.websocket_relay import is_websocket_upgrade, relay_websocket

log = logging.getLogger("edge_proxy")

FINALIZE_TIMEOUT_SECONDS = 5.0
# End-of-request bookkeeping (finalize, metrics, access log, economics) runs when the loop has been
# quiet for FINAL_QUIET_SECONDS, at most FINAL_MAX_DELAY_SECONDS after a request ended, and in
# slices of FINAL_SLICE requests: requests that end together (one decode step of a batch) and the
# clients' next requests that arrive right then are not delayed by it (docs/benchmarks.md).
FINAL_QUIET_SECONDS = 0.002
FINAL_MAX_DELAY_SECONDS = 0.05
FINAL_SLICE = 16
CONTENT_LOG_MAX_CHARS = 4096
RELAY_HIGH_WATER = 256 * 1024     # client write buffer above this: stop reading the backend
REQUEST_ID_HEADER = "x-edge-request-id"   # on every instrumented response: the id for /edge/feedback


def _relay_chunk(splitter: SSESplitter, acct: Any, chunk: bytes, t_ns: int) -> bytes | None:
    """One chunk from the backend: the complete SSE events in it, accounted (tokens, usage) and
    kept or dropped by ``acct``; the bytes to send to the client, or None if nothing is to go."""
    try:
        events = splitter.feed(chunk)
    except EventTooLarge as exc:     # the events before the endless one still go to the client
        parts = [kept for ev in exc.events if (kept := acct.event(ev, event_data(ev), t_ns)) is not None]
        exc.kept = b"".join(parts) if parts else None
        raise
    if not events:
        return None
    if len(events) == 1:
        ev = events[0]
        return acct.event(ev, event_data(ev), t_ns)
    parts = [kept for ev in events if (kept := acct.event(ev, event_data(ev), t_ns)) is not None]
    return b"".join(parts) if parts else None


_INCLUDE_USAGE = b'"stream_options":{"include_usage":true}'


def with_include_usage(body: bytes, obj: dict[str, Any]) -> bytes:
    """The request body asking for usage in the stream (``stream_options.include_usage``).

    ``obj`` is ``body`` parsed (a JSON object). Without ``stream_options`` the field is inserted
    before the closing brace and every other byte is the client's (no re-encoding: cheaper, and
    the backend sees the client's own formatting); otherwise the object is re-encoded with
    ``include_usage`` set in the client's ``stream_options``."""
    head = body.lstrip()[:2]
    # splice only into UTF-8 without a BOM (json.loads also reads UTF-16/32 and a BOM)
    if "stream_options" not in obj and head[:1] == b"{" and head[1:] != b"\x00":
        end = body.rstrip().rfind(b"}")
        if end > 0:
            return body[:end] + (b"," if obj else b"") + _INCLUDE_USAGE + body[end:]
    so = obj.get("stream_options")
    so = dict(so) if isinstance(so, dict) else {}
    so["include_usage"] = True
    return json.dumps(dict(obj, stream_options=so)).encode()


def is_connect_failure(exc: BaseException) -> bool:
    """The backend could not be reached: refused, unreachable, or the connect timed out (502,
    ``connect``; the cold-start gate treats it as a backend that is down)."""
    return isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))


def _tag(out: web.StreamResponse, rec: RequestRecord) -> None:
    """The request's ids on its response: ours (the key for /edge/feedback) and the client's
    own x-request-id echoed back (unless the backend's response already carries one)."""
    out.headers[REQUEST_ID_HEADER] = rec.request_id
    if rec.client_request_id is not None and "x-request-id" not in out.headers:
        out.headers["x-request-id"] = rec.client_request_id


def _mark_terminated(rec: RequestRecord, acct: Any) -> None:
    """The stream's terminator reached the client: the outcome is final now (docs/metrics.md,
    Outcomes). A client that closes right after reading it (the openai SDK, huggingface_hub and
    other httpx clients do) did not cancel anything: the request is ok."""
    if rec.outcome is None:
        rec.outcome = "error" if acct.backend_error else "ok"
        if acct.backend_error:
            rec.error_type = "upstream_status"


def _done_with(resp: Any, complete: bool) -> None:
    """Give a backend response back: a fully read one keeps its connection for reuse; otherwise
    (client gone, error, timeout) the connection is dropped at once."""
    if complete:
        resp.release()
    else:
        resp.close()


@dataclass(frozen=True)
class RouteSpec:
    api: Api
    operation: str
    stream: bool | None   # None: from the body's "stream" field


GENERATION_ROUTES: dict[str, RouteSpec] = {
    "/v1/chat/completions": RouteSpec("openai", "chat", None),
    "/v1/completions": RouteSpec("openai", "text_completion", None),
    "/generate": RouteSpec("tgi", "text_completion", False),
    "/generate_stream": RouteSpec("tgi", "text_completion", True),
    "/": RouteSpec("tgi", "text_completion", None),
}
METADATA_ROUTES = frozenset({"/v1/models", "/info", "/health"})


@dataclass
class BackendInfo:
    """What the proxy knows about its backend (probed at startup, refreshed lazily)."""

    url: str
    kind: str = "unknown"              # model_server | tgi | openai | unknown
    model: str | None = None           # served model id (bounded label)
    models: set[str] = field(default_factory=set)
    info: dict[str, Any] | None = None


def _overrides(obs: object, name: str) -> bool:
    return getattr(type(obs), name, None) is not getattr(BaseObserver, name)


class _Forwarded(Exception):
    """Internal: a response is ready to return (error paths)."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response


class ProxyCore:
    def __init__(self, settings: Settings, metrics: ProxyMetrics, tracing: Tracing | None,
                 observers: list[RequestObserver], outputs: list[RequestObserver],
                 backend: BackendInfo, gate_ref: Callable[[], BackendGate | None]) -> None:
        self.settings = settings
        self.ps = settings.proxy
        self.metrics = metrics
        self.tracing = tracing
        self.observers = observers        # other components (mutable until startup)
        self.outputs = outputs            # core outputs: metrics, access log, tracing
        self.backend = backend
        self._gate_ref = gate_ref
        self.fd_exhaustion = FdExhaustion(metrics.process_errors)   # EMFILE: 503, not "backend unreachable"
        self.session: aiohttp.ClientSession | None = None
        self.relay: RelayPool | None = None     # lean streaming client (plain http backends)
        self.relay_host = ""
        self.relay_prefix = ""
        self.pending_finals: set[asyncio.Task[None]] = set()
        self.live: dict[int, tuple[RequestRecord, web.Request]] = {}   # generation requests (shutdown.py)
        self._failed_observers: set[int] = set()
        self._urls: dict[str, URL] = {}
        # routes forwarded to the backend (proxy.forward_routes); the rest get 404
        self._forward = RouteAllowList(self.ps.forward_routes)
        self._gen_routes = {p: r for p, r in GENERATION_ROUTES.items() if self._forward.allows(p)}
        # ended requests whose bookkeeping waits for a quiet loop (see FINAL_QUIET_SECONDS)
        # (record, finalized): finalized ones only wait for their on_request_final calls
        self._ended: list[tuple[RequestRecord, bool]] = []
        self._ended_first = 0.0
        self._ended_last = 0.0
        self._ended_timer: asyncio.Handle | None = None
        self._learning: asyncio.Future[bool] | None = None    # a probe after a hold (model label)
        self._freeze()

    # ---- lifecycle -------------------------------------------------------------------------
    def _freeze(self) -> None:
        obs = list(self.observers)
        self._start_obs = [o for o in obs if _overrides(o, "on_request_start")]
        self._token_obs = [o for o in obs if _overrides(o, "on_tokens")]
        self._token_calls = [o.on_tokens for o in self._token_obs]   # bound once (hot path)
        self._end_obs = [o for o in obs if _overrides(o, "on_request_end")]
        self._finalize_obs = [o for o in obs if _overrides(o, "finalize")]
        self._final_obs = [o for o in obs + list(self.outputs) if _overrides(o, "on_request_final")]
        self._output_final = [o for o in self.outputs if _overrides(o, "on_request_final")]
        # extra response headers computed from the request's state (energy: x-edge-energy-joules,
        # opt-in); an observer says whether it wants them now with ``wants_response_headers``
        self._header_calls = [o.response_headers for o in obs
                              if callable(getattr(o, "response_headers", None))
                              and getattr(o, "wants_response_headers", True)]

    async def on_startup(self, app: web.Application) -> None:
        self._freeze()
        ps = self.ps
        timeout = aiohttp.ClientTimeout(total=None, connect=ps.connect_timeout_seconds,
                                        sock_read=ps.upstream_timeout_seconds)
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=False)
        u = URL(self.backend.url)
        if ps.stream_relay == "raw" and u.scheme == "http" and u.host:
            self.relay = RelayPool(u.host, u.port or 80, ps.connect_timeout_seconds,
                                   ps.upstream_timeout_seconds)
            self.relay_host = u.raw_authority
            self.relay_prefix = u.raw_path.rstrip("/")     # backend URL with a path prefix
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),   # a proxy never keeps one client's cookies for another
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"))

    async def on_cleanup(self, app: web.Application) -> None:
        await self.drain()
        if self.session is not None:
            await self.session.close()
        if self.relay is not None:
            self.relay.close()

    async def drain(self, timeout: float = FINALIZE_TIMEOUT_SECONDS + 1.0) -> None:
        """Run the queued end-of-request work now and wait for pending finalize/final tasks
        (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while True:
            if self._ended_timer is not None:
                self._ended_timer.cancel()
                self._ended_timer = None
            while self._ended:
                self._run_ended()
            left = deadline - time.monotonic()
            if not self.pending_finals or left <= 0:
                return
            # finalize tasks queue their records' final calls when they finish: run those too
            await asyncio.wait(list(self.pending_finals), timeout=left)

    # ---- observer dispatch (never raises into the proxy) ----------------------------------------
    def _call(self, obs: object, name: str, *args: Any) -> None:
        try:
            getattr(obs, name)(*args)
        except Exception:  # noqa: BLE001 - an observer must never break a request
            self._log_failure(obs, name)

    def _log_failure(self, obs: object, name: str) -> None:
        if id(obs) not in self._failed_observers:
            self._failed_observers.add(id(obs))
            log.exception("observer %s.%s failed (logged once)", type(obs).__name__, name)

    def _tokens(self, rec: RequestRecord, n: int, t_ns: int) -> None:
        if rec.t_first_token_ns is None:
            rec.t_first_token_ns = t_ns
        rec.t_last_token_ns = t_ns
        if n == 1:
            rec.token_times_ns.append(t_ns)
        else:
            rec.token_times_ns.extend([t_ns] * n)
        for f in self._token_calls:
            try:
                f(rec, n, t_ns)
            except Exception:  # noqa: BLE001 - an observer must never break a request
                self._log_failure(f.__self__, "on_tokens")

    def _end(self, rec: RequestRecord, started: bool, counted: bool = True) -> None:
        if counted:          # (not counted: rejected before its body was complete)
            self.metrics.in_flight.dec()
        if not started:
            for o in self._output_final:
                self._call(o, "on_request_final", rec)
            return
        for o in self._end_obs:          # O(1) each: they stamp the end (energy, economics)
            self._call(o, "on_request_end", rec)
        # the rest waits for a quiet loop (bounded delay)
        self._ended_last = time.monotonic()
        self._queue_final(rec, False)

    def _queue_final(self, rec: RequestRecord, finalized: bool) -> None:
        if not self._ended:
            self._ended_first = time.monotonic()
        self._ended.append((rec, finalized))
        if self._ended_timer is None:
            self._ended_timer = asyncio.get_running_loop().call_later(FINAL_QUIET_SECONDS,
                                                                      self._ended_due)

    def _ended_due(self) -> None:
        # time.monotonic(), not loop.time(): uvloop's loop time is cached at 1 ms resolution.
        # One check per FINAL_QUIET_SECONDS at most while requests keep ending.
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        if now - self._ended_last < FINAL_QUIET_SECONDS and now - self._ended_first < FINAL_MAX_DELAY_SECONDS:
            self._ended_timer = loop.call_later(FINAL_QUIET_SECONDS, self._ended_due)
            return
        self._run_ended_slices()

    def _run_ended_slices(self) -> None:
        """One slice now, the rest in later loop turns (I/O that arrived meanwhile goes between)."""
        self._run_ended()
        self._ended_timer = (asyncio.get_running_loop().call_soon(self._run_ended_slices)
                             if self._ended else None)

    def _run_ended(self) -> None:
        batch, self._ended = self._ended[:FINAL_SLICE], self._ended[FINAL_SLICE:]
        for rec, finalized in batch:
            if self._finalize_obs and not finalized:
                task = asyncio.get_running_loop().create_task(self._finalize(rec))
                self.pending_finals.add(task)
                task.add_done_callback(self.pending_finals.discard)
            else:
                self._final(rec)

    async def _finalize(self, rec: RequestRecord) -> None:
        """Wait (bounded) for the finalize observers (energy: the request's ticks), then queue the
        request's final calls for a quiet loop like its end: requests finalized by the same tick
        do not all run their metrics, access log and economics in one loop turn."""
        async def one(o: Any) -> None:
            try:
                await o.finalize(rec)
            except Exception:  # noqa: BLE001
                if id(o) not in self._failed_observers:
                    self._failed_observers.add(id(o))
                    log.exception("observer %s.finalize failed (logged once)", type(o).__name__)
        try:
            async with asyncio.timeout(FINALIZE_TIMEOUT_SECONDS):
                if len(self._finalize_obs) == 1:
                    await one(self._finalize_obs[0])
                else:
                    await asyncio.gather(*(one(o) for o in self._finalize_obs))
        except TimeoutError:
            log.warning("finalize of request %s did not finish in time", rec.request_id)
        except asyncio.CancelledError:      # shutting down: its final calls now, with what is known
            self._final(rec)
            return
        self._queue_final(rec, True)

    def _final(self, rec: RequestRecord) -> None:
        for o in self._final_obs:
            self._call(o, "on_request_final", rec)

    def _url(self, path_qs: str) -> URL:
        """Backend URL for a request path, built once per distinct path (bounded cache)."""
        url = self._urls.get(path_qs)
        if url is None:
            url = URL(self.backend.url + path_qs, encoded=True)
            if len(self._urls) < 256:
                self._urls[path_qs] = url
        return url

    def _first_byte_timeout(self) -> float:
        """Seconds a response head may take on streams and pass-through routes (the shorter of
        first_byte_timeout_seconds and upstream_timeout_seconds; 0 = unset)."""
        limits = [t for t in (self.ps.first_byte_timeout_seconds, self.ps.upstream_timeout_seconds) if t]
        return min(limits) if limits else 0.0

    async def _relabel_after_hold(self, rec: RequestRecord, requested: Any) -> None:
        """A request held while the backend was down was labelled before the backend's model was
        known: learn it now (one probe, shared by every request released together), then relabel,
        so no series is labelled model="unknown" for a backend that names its model."""
        if rec.model != "unknown" or self.ps.model_name:
            return
        if self.backend.model is None and self.session is not None:
            task = self._learning
            if task is None or task.done():
                from edge_proxy.proxy.backend_probe import probe_once
                task = self._learning = asyncio.ensure_future(
                    probe_once(self.session, self.backend, self.ps.backend_kind))
            try:
                await asyncio.wait_for(asyncio.shield(task), 5.0)
            except (asyncio.TimeoutError, aiohttp.ClientError, OSError):
                pass
            self.metrics.backend_kind = self.backend.kind
        rec.model = self.model_label(requested)
        if rec.model != "unknown":
            self.metrics.touch(rec.model, rec.route, rec.stream)

    # ---- errors the proxy makes (edge_proxy.proxy.errors) ----------------------------------------------
    def api_for_path(self, path: str) -> Api:
        return api_for_path(path, self.backend.kind)

    def failure_message(self, exc: BaseException | str, tokens: int | None = None) -> str:
        return failure_message(exc, self.backend.url, self.ps.upstream_timeout_seconds, tokens)

    # ---- labels ----------------------------------------------------------------------------------
    def model_label(self, requested: Any) -> str:
        if self.ps.model_name:
            return self.ps.model_name
        if isinstance(requested, str) and requested in self.backend.models:
            return requested
        return self.backend.model or "unknown"

    # ---- entry point -----------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        t0 = time.monotonic_ns()
        path = request.path
        if request.method == "POST":
            spec = self._gen_routes.get(path)
            if spec is not None:
                return await self._generation(request, spec, t0)
        if not self._forward.allows(path):
            return error_response(self.api_for_path(path), 404, "not_forwarded",
                                  "no such route on this proxy (proxy.forward_routes)")
        if is_websocket_upgrade(request):        # any path: relayed as a WebSocket
            assert self.session is not None
            return await relay_websocket(request, self.session, self.backend.url)
        if request.method == "GET" and path in METADATA_ROUTES:
            return await self._passthrough(request, t0, route=path)
        return await self._passthrough(request, t0, route=None)

    # ---- generation requests ---------------------------------------------------------------------
    async def _generation(self, request: web.Request, spec: RouteSpec, t0: int) -> web.StreamResponse:
        # the proxy's own id keys everything (ledger, feedback): unguessable, one per request;
        # the client's x-request-id is only a label (logs, spans) and is echoed back
        rid = request.headers.get("x-request-id")
        rec = RequestRecord(request_id=secrets.token_hex(16),
                            client_request_id=rid if rid and len(rid) <= 128 else None,
                            route=request.path, api=spec.api, operation=spec.operation,
                            model=self.model_label(None), t_received_ns=t0)
        self.live[id(rec)] = (rec, request)
        started = False
        counted = False          # in flight only once its body is complete
        defer_end = False
        whole: list[tuple[bytes, int]] = []     # a whole 200 body, accounted after it is written
        try:
            try:
                if request.content.is_eof():     # the whole body came with the head: no timer
                    body = await request.read()
                else:
                    async with asyncio.timeout(self.ps.request_body_timeout_seconds or None):
                        body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return self._reject(rec, 413, "too_large",
                                    f"request body exceeds {self.ps.max_body_bytes} bytes")
            except TimeoutError:
                late = self._reject(rec, 408, "client_timeout", "request body not complete in "
                                    f"{self.ps.request_body_timeout_seconds:g} s")
                late.force_close()           # the rest of the body is not waited for
                return late
            self.metrics.in_flight.inc()
            counted = True
            try:
                obj = json_input.loads(body)
            except ValueError:
                return self._reject(rec, 400, "bad_request", "request body is not valid JSON")
            if not isinstance(obj, dict):
                return self._reject(rec, 400, "bad_request", "request body must be a JSON object")
            strip_usage = False
            if spec.api == "openai":
                # the flag as the backend will read it (vLLM coerces "yes", 1, "true": request_flags)
                rec.stream = backend_bool(obj.get("stream"), self.backend.kind)
                requested_model = obj.get("model")
                mt = obj.get("max_completion_tokens", obj.get("max_tokens"))
                if rec.stream:
                    so = obj.get("stream_options")
                    if not (isinstance(so, dict)
                            and backend_bool(so.get("include_usage"), self.backend.kind)):
                        body = with_include_usage(body, obj)
                        strip_usage = True
            else:
                rec.stream = spec.stream if spec.stream is not None else backend_bool(
                    obj.get("stream"), "tgi")
                params = obj.get("parameters")
                mt = params.get("max_new_tokens") if isinstance(params, dict) else None
                requested_model = obj.get("model")
            rec.max_tokens = mt if isinstance(mt, int) and not isinstance(mt, bool) else None
            rec.model = self.model_label(requested_model)
            if rec.model == "unknown" and isinstance(requested_model, str):
                rec.extra["requested_model"] = requested_model[:256]   # relabel after a hold
            if rec.model != "unknown":
                self.metrics.touch(rec.model, rec.route, rec.stream)
            if self.ps.log_content:
                rec.extra["content"] = body[:CONTENT_LOG_MAX_CHARS].decode("utf-8", "replace")

            started = True
            for o in self._start_obs:
                self._call(o, "on_request_start", rec)
            if self.tracing is not None:
                self.tracing.start(rec, requested_model if isinstance(requested_model, str) else None,
                                   request.headers)
            gate = self._gate_ref()
            if gate is not None:
                rec.extra["request_bytes"] = len(body)      # held bytes are bounded (coldstart.max_held_bytes)
                try:
                    await gate.acquire(rec)
                except GateRejected as exc:
                    rec.outcome = "rejected"
                    rec.error_type = exc.reason
                    rec.status = 503
                    out = error_response(spec.api, 503, exc.reason, exc.message)
                    _tag(out, rec)
                    if exc.retry_after_seconds is not None:
                        out.headers["Retry-After"] = str(exc.retry_after_seconds)
                    return out
                await self._relabel_after_hold(rec, requested_model)
            out = await self._forward_generation(request, rec, spec, body, strip_usage, whole)
            # a whole (non-streamed) response is written after this returns: the end-of-request
            # observer work runs after the write (next loop iteration), off the response's path
            defer_end = not out.prepared
            if defer_end:       # (a streamed response got the header before it started)
                _tag(out, rec)
            return out
        except asyncio.CancelledError:
            if rec.outcome is None:
                rec.outcome = "cancelled"
                rec.error_type = "client_disconnect"
                rec.status = rec.status or 499
            raise
        finally:
            self.live.pop(id(rec), None)
            if rec.outcome is None:
                rec.outcome = "error"
                rec.error_type = rec.error_type or "internal"
            if rec.t_end_ns is None:
                rec.t_end_ns = time.monotonic_ns()
            if defer_end:
                asyncio.get_running_loop().call_soon(self._account_whole_then_end, rec, started,
                                                     whole[0] if whole else None)
            else:
                self._end(rec, started, counted)

    def _reject(self, rec: RequestRecord, status: int, error_type: str, msg: str) -> web.Response:
        rec.status = status
        rec.outcome = "error"
        rec.error_type = error_type
        out = error_response(rec.api, status, error_type, msg)  # type: ignore[arg-type]
        _tag(out, rec)
        return out

    def _upstream_failure(self, rec: RequestRecord, exc: BaseException) -> web.Response:
        """Map a failure before response headers to 502/504 in the client's format."""
        api: Api = rec.api  # type: ignore[assignment]
        if is_fd_exhaustion(exc):
            rec.error_type, rec.status, rec.outcome = FD_ERROR_TYPE, FD_STATUS, "error"
            return self.fd_exhaustion.response(api, exc)
        if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)) \
                and not is_connect_failure(exc):
            rec.error_type = "timeout"
            rec.status = 504
            rec.outcome = "timeout"
            return error_response(api, 504, "timeout", "backend did not answer in time")
        if is_connect_failure(exc):
            gate = self._gate_ref()
            if gate is not None:
                gate.notify_backend_failure()
            rec.error_type = "connect"
            msg = self.failure_message(exc)
        else:
            rec.error_type = "stream_broken"
            msg = self.failure_message(exc)
        rec.status = 502
        rec.outcome = "error"
        return error_response(api, 502, rec.error_type, msg)

    async def _forward_generation(self, request: web.Request, rec: RequestRecord, spec: RouteSpec,
                                  body: bytes, strip_usage: bool,
                                  whole: list[tuple[bytes, int]]) -> web.StreamResponse:
        assert self.session is not None
        headers = request_headers(request.headers, request.remote)
        if "x-request-id" not in headers:
            headers["x-request-id"] = rec.request_id     # the backend's logs can name it too
        headers["Accept-Encoding"] = "identity"
        if "Content-Type" not in headers:
            headers["Content-Type"] = "application/json"
        if self.tracing is not None:
            carrier: dict[str, str] = {}
            self.tracing.inject(rec, carrier)
            headers.update(carrier)
        url = self._url(request.path_qs)
        gate = self._gate_ref()
        for attempt in (0, 1):
            rec.t_forwarded_ns = time.monotonic_ns()
            try:
                resp = await self._send(request, url, body, headers, rec.stream)
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
                    rec.outcome, rec.error_type, rec.status = "rejected", rej.reason, 503
                    rec.t_end_ns = time.monotonic_ns()
                    out = error_response(rec.api, 503, rej.reason, rej.message)  # type: ignore[arg-type]
                    if rej.retry_after_seconds is not None:
                        out.headers["Retry-After"] = str(rej.retry_after_seconds)
                    return out
                await self._relabel_after_hold(rec, rec.extra.get("requested_model"))
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
            _done_with(resp, complete)

    async def _send(self, request: web.Request, url: URL, body: bytes, headers: Any,
                    stream: bool) -> Any:
        """Send a generation request to the backend over the lean relay (plain http backends),
        else through aiohttp. Returns once the response headers arrived."""
        # a stream's head is due within first_byte_timeout_seconds; a whole answer's head comes
        # with the answer, so it may take upstream_timeout_seconds
        head_timeout = self._first_byte_timeout() if stream else self.ps.upstream_timeout_seconds
        if self.relay is not None:
            head = request_head("POST", self.relay_prefix + request.path_qs, self.relay_host, headers,
                                len(body))
            return await self.relay.request(head, body, head_timeout)
        assert self.session is not None
        async with asyncio.timeout(head_timeout or None):
            return await self.session.request("POST", url, data=body, headers=headers,
                                              allow_redirects=False)

    async def _whole(self, rec: RequestRecord, resp: aiohttp.ClientResponse,
                     whole: list[tuple[bytes, int]]) -> web.StreamResponse:
        """Non-streaming (or error) response: read it and answer in one piece. A 200 body goes
        into ``whole`` with its arrival time: its tokens are accounted right after the response
        is written (:meth:`_account_whole_then_end`), not on the response's path."""
        try:
            data = await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            rec.t_end_ns = time.monotonic_ns()
            return self._upstream_failure(rec, exc)
        rec.status = resp.status
        if resp.status == 200:
            if self._header_calls:
                # a header computed from the request's state wants its tokens counted first
                self._account_whole(rec, data, time.monotonic_ns())
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
        for f in self._header_calls:   # optional extra headers (energy: x-edge-energy-joules, provisional)
            try:
                out.headers.update(f(rec))
            except Exception:  # noqa: BLE001 - never fail a response for a header
                pass
        rec.t_end_ns = time.monotonic_ns()
        return out

    def _account_whole_then_end(self, rec: RequestRecord, started: bool,
                                whole: tuple[bytes, int] | None) -> None:
        """After a whole response was written: its tokens, then the end of the request."""
        if whole is not None:
            self._account_whole(rec, *whole)
        self._end(rec, started)

    def _account_whole(self, rec: RequestRecord, data: bytes, t: int) -> None:
        """Token counts of a whole 200 response (from the body, else the backend's headers) and
        the token observers' call."""
        n_out: int | None = None
        try:
            obj = json_input.loads(data)
        except ValueError:
            obj = None
        if obj is not None:
            n_out = account_openai_body(rec, obj) if rec.api == "openai" else account_tgi_body(rec, obj)
        if n_out is None and "header_generated_tokens" in rec.extra:
            n_out = int(rec.extra["header_generated_tokens"])  # type: ignore[arg-type]
        if n_out is not None:
            rec.output_tokens = n_out
            rec.token_count_source = "backend"
            if n_out:
                for o in self._token_obs:
                    self._call(o, "on_tokens", rec, n_out, t)

    async def _stream(self, request: web.Request, rec: RequestRecord, resp: aiohttp.ClientResponse,
                      strip_usage: bool) -> web.StreamResponse:
        rec.status = resp.status
        out = web.StreamResponse(status=resp.status, headers=response_headers(resp.headers))
        _tag(out, rec)
        if rec.cold_start:
            out.headers.update(cold_start_headers(rec))
        await out.prepare(request)
        sink = lambda n, t: self._tokens(rec, n, t)  # noqa: E731
        acct: OpenAIStream | TGIStream = (OpenAIStream(rec, strip_usage, sink) if rec.api == "openai"
                                          else TGIStream(rec, sink))
        splitter = SSESplitter(self.ps.max_sse_event_bytes)
        api: Api = rec.api  # type: ignore[assignment]
        if isinstance(resp, RawResponse):
            return await self._relay_stream(request, rec, resp, out, acct, splitter)
        try:
            try:
                async for chunk in resp.content.iter_any():
                    kept = _relay_chunk(splitter, acct, chunk, time.monotonic_ns())
                    if kept is not None:
                        await out.write(kept)
                        if acct.terminated:
                            _mark_terminated(rec, acct)
                rest = (acct.flush() if isinstance(acct, OpenAIStream) else b"") + splitter.pending
                if rest:
                    await out.write(rest)
                _mark_terminated(rec, acct)
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                    aiohttp.ClientOSError) as exc:
                if acct.terminated:      # the client has the whole answer: nothing to report
                    await out.write_eof()
                    return out
                rec.outcome = "error"
                rec.error_type = "stream_broken"
                await out.write(error_event(api, "stream_broken",
                                            self.failure_message(exc, acct.counted)))
            except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
                if acct.terminated:
                    await out.write_eof()
                    return out
                rec.outcome = "timeout"
                rec.error_type = "timeout"
                await out.write(error_event(api, "timeout",
                                            f"backend sent nothing for {self.ps.upstream_timeout_seconds:g} s"))
            except EventTooLarge as exc:
                resp.close()
                rec.outcome = "error"
                rec.error_type = "stream_broken"
                await out.write((exc.kept or b"") + error_event(api, "stream_broken", str(exc)))
            await out.write_eof()
        except ConnectionResetError:  # aiohttp.ClientConnectionResetError is one too
            # Writing to a client that is gone (without handler cancellation); after the
            # terminator the outcome is already final (ok).
            if rec.outcome is None:
                rec.outcome = "cancelled"
                rec.error_type = "client_disconnect"
                rec.status = 499
            raise asyncio.CancelledError() from None
        finally:
            acct.finish()
            rec.t_end_ns = time.monotonic_ns()
        return out

    async def _relay_stream(self, request: web.Request, rec: RequestRecord, resp: RawResponse,
                            out: web.StreamResponse, acct: Any, splitter: SSESplitter) -> web.StreamResponse:
        """Streaming body over the lean relay: every backend chunk is framed, accounted and written
        to the client inside the backend protocol's callback (no task switch per event)."""
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
                data = _relay_chunk(splitter, acct, chunk, t)
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
                _mark_terminated(rec, acct)
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
                rest = (acct.flush() if isinstance(acct, OpenAIStream) else b"") + splitter.pending
                if rest:
                    await out.write(rest)
            if rec.outcome is not None:
                pass
            elif "too_large" in state:
                rec.outcome = "error"
                rec.error_type = "stream_broken"
                await out.write(error_event(api, "stream_broken", str(state["too_large"])))
            elif result == "ok":
                _mark_terminated(rec, acct)
            elif result == "timeout":
                rec.outcome = "timeout"
                rec.error_type = "timeout"
                await out.write(error_event(api, "timeout",
                                            f"backend sent nothing for {self.ps.upstream_timeout_seconds:g} s"))
            else:
                rec.outcome = "error"
                rec.error_type = "stream_broken"
                await out.write(error_event(api, "stream_broken", self.failure_message(result, acct.counted)))
            await out.write_eof()
        except ConnectionResetError:
            if rec.outcome is None:      # after the terminator the outcome is final (ok)
                rec.outcome = "cancelled"
                rec.error_type = "client_disconnect"
                rec.status = 499
            raise asyncio.CancelledError() from None
        finally:
            state.pop("resume", None)
            resp.detach()
            acct.finish()
            rec.t_end_ns = time.monotonic_ns()
        return out

    # ---- pass-through ----------------------------------------------------------------------------
    async def _passthrough(self, request: web.Request, t0: int, route: str | None) -> web.StreamResponse:
        """Forward any request as-is; stream the response back. ``route``: count it under that label.

        The request body is streamed to the backend as it arrives (no size limit of ours: the
        ``max_body_bytes`` limit is for the bodies the proxy parses, the generation requests), with
        the client's Content-Length when it sent one, else chunked."""
        assert self.session is not None
        status = 0
        try:
            headers = request_headers(request.headers, request.remote)
            data: Any = None
            if request.body_exists:
                data = request.content
                length = request.headers.get("Content-Length")
                if length is not None:
                    headers["Content-Length"] = length
            try:
                async with asyncio.timeout(self._first_byte_timeout() or None):
                    resp = await self.session.request(
                        request.method, URL(self.backend.url + request.path_qs, encoded=True),
                        data=data, headers=headers, allow_redirects=False)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                if is_fd_exhaustion(exc):
                    status = FD_STATUS
                    return self.fd_exhaustion.response("other", exc)
                # one rule with generation routes: 502 = backend not reached (refused or connect
                # timeout), 504 = reached but no answer in time
                status = 504 if isinstance(exc, asyncio.TimeoutError) and not is_connect_failure(exc) \
                    else 502
                if is_connect_failure(exc):
                    gate = self._gate_ref()
                    if gate is not None:
                        gate.notify_backend_failure()
                return error_response(self.api_for_path(request.path), status,
                                      "timeout" if status == 504 else "connect",
                                      self.failure_message(exc))
            complete = False
            try:
                status = resp.status
                out = web.StreamResponse(status=resp.status, reason=resp.reason,
                                         headers=response_headers(resp.headers))
                await out.prepare(request)
                try:
                    async for chunk in resp.content.iter_any():
                        await out.write(chunk)
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    return out   # connection to the client ends without a clean terminator
                await out.write_eof()
                complete = True
                return out
            finally:
                _done_with(resp, complete)
        finally:
            if route is not None:
                self.metrics.requests.labels(self.model_label(None), self.backend.kind, route, "false",
                                             str(status), "ok" if 0 < status < 400 else "error").inc()
                self.metrics.duration.labels(self.model_label(None), route, "false",
                                             "ok" if 0 < status < 400 else "error").observe(
                    (time.monotonic_ns() - t0) / 1e9)
