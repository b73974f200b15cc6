"""The proxy core: the client-facing app's one request handler and what every route shares.

Instrumented routes (generation): ``POST /v1/chat/completions``, ``/v1/completions`` (OpenAI),
``/generate``, ``/generate_stream``, ``/`` (TGI): ``forward``. Metadata routes ``GET /v1/models``,
``/info``, ``/health`` are forwarded and counted; every other route that ``proxy.forward_routes``
allows passes through untouched (``passthrough``; WebSocket upgrades: ``websocket_relay``); the
rest get 404 (``edge_proxy.proxy.forward_routes``).

Owns: the backend client resources (the aiohttp session, the relay: :meth:`ProxyCore.open` /
:meth:`ProxyCore.close`, called by the runtime), the requests in flight (:attr:`ProxyCore.live`,
for shutdown), labels (model), the cold-start gate's place (:attr:`ProxyCore.gate`, set before
start), the messages about backend failures. Must not: move stream bytes (``relay_*``), call
observers itself (``bookkeeping``), or listen on ports (``runtime``).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from edge_proxy.config import Settings
from edge_proxy.telemetry.metrics import ProxyMetrics
from edge_proxy.proxy.backend_probe import BackendInfo, probe_once
from edge_proxy.proxy.bookkeeping import Bookkeeping
from edge_proxy.proxy.errors import Api, api_for_path, error_response, failure_message
from edge_proxy.proxy.fd_exhaustion import FdExhaustion
from edge_proxy.proxy.forward import Forwarder
from edge_proxy.proxy.forward_routes import GENERATION_ROUTES, METADATA_ROUTES, RouteAllowList
from edge_proxy.proxy.hooks import BackendGate, RequestObserver, RequestRecord
from edge_proxy.proxy.passthrough import passthrough
from edge_proxy.proxy.relay import Relay
from edge_proxy.proxy.relay_aiohttp import AiohttpRelay
from edge_proxy.proxy.relay_raw import RawRelay
from edge_proxy.proxy.websocket_relay import is_websocket_upgrade, relay_websocket
from edge_proxy.telemetry.tracing import Tracing


class ProxyCore:
    """Request handling for one backend. ``observers``: the components (energy, economics, ...;
    the list may grow until :meth:`open`); ``outputs``: the core outputs (metrics, access log,
    tracing), called last; ``gate``: the cold-start gate (hold mode) or None."""

    def __init__(self, settings: Settings, metrics: ProxyMetrics, tracing: Tracing | None,
                 observers: list[RequestObserver], outputs: list[RequestObserver],
                 backend: BackendInfo, gate: BackendGate | None = None) -> None:
        self.settings = settings
        self.ps = settings.proxy
        self.metrics = metrics
        self.tracing = tracing
        self.backend = backend
        self.gate = gate
        self.book = Bookkeeping(metrics, observers, outputs)
        self.fd_exhaustion = FdExhaustion(metrics.process_errors)   # EMFILE: 503, not "backend unreachable"
        self.session: aiohttp.ClientSession | None = None
        self.relay: Relay | None = None      # generation routes: raw (plain http) or aiohttp
        self.live: dict[int, tuple[RequestRecord, web.Request]] = {}   # generation requests (shutdown.py)
        # routes forwarded to the backend (proxy.forward_routes); the rest get 404
        self._forward = RouteAllowList(self.ps.forward_routes)
        self._gen_routes = {p: r for p, r in GENERATION_ROUTES.items() if self._forward.allows(p)}
        self._generation = Forwarder(self).generation
        self._learning: asyncio.Future[bool] | None = None    # a probe after a hold (model label)

    # ---- resources -------------------------------------------------------------------------------
    async def open(self) -> None:
        """Freeze the observers; open the backend client (session; the lean relay on plain http
        unless ``proxy.stream_relay`` is ``aiohttp``)."""
        self.book.freeze()
        ps = self.ps
        timeout = aiohttp.ClientTimeout(total=None, connect=ps.connect_timeout_seconds,
                                        sock_read=ps.upstream_timeout_seconds)
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=False)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),   # a proxy never keeps one client's cookies for another
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"))
        u = URL(self.backend.url)
        if ps.stream_relay == "raw" and u.scheme == "http" and u.host:
            self.relay = RawRelay(self.backend.url, ps.connect_timeout_seconds, ps.upstream_timeout_seconds)
        else:
            self.relay = AiohttpRelay(self.session, self.backend.url, ps.upstream_timeout_seconds)

    async def close(self) -> None:
        """Close what :meth:`open` opened (safe to call twice, or without :meth:`open`)."""
        if self.relay is not None:
            await self.relay.close()
            self.relay = None
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def drain(self) -> None:
        """Run the queued end-of-request work now and wait for it (tests, shutdown)."""
        await self.book.drain()

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
            return await passthrough(self, request, t0, route=path)
        return await passthrough(self, request, t0, route=None)

    # ---- shared by the routes --------------------------------------------------------------------
    def first_byte_timeout(self) -> float:
        """Seconds a response head may take on streams and pass-through routes (the shorter of
        first_byte_timeout_seconds and upstream_timeout_seconds; 0 = unset)."""
        limits = [t for t in (self.ps.first_byte_timeout_seconds, self.ps.upstream_timeout_seconds) if t]
        return min(limits) if limits else 0.0

    def api_for_path(self, path: str) -> Api:
        return api_for_path(path, self.backend.kind)

    def failure_message(self, exc: BaseException | str, tokens: int | None = None) -> str:
        return failure_message(exc, self.backend.url, self.ps.upstream_timeout_seconds, tokens)

    def model_label(self, requested: Any) -> str:
        if self.ps.model_name:
            return self.ps.model_name
        if isinstance(requested, str) and requested in self.backend.models:
            return requested
        return self.backend.model or "unknown"

    async def relabel_after_hold(self, rec: RequestRecord, requested: Any) -> None:
        """A request held while the backend was down was labelled before the backend's model was
        known: learn it now (one probe, shared by every request released together), then relabel,
        so no series is labelled model="unknown" for a backend that names its model."""
        if rec.model != "unknown" or self.ps.model_name:
            return
        if self.backend.model is None and self.session is not None:
            task = self._learning
            if task is None or task.done():
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

