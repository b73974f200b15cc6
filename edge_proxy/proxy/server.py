"""Assembly: ``build_proxy(settings) -> ProxyRuntime``.

Other components plug in HERE, with one or two lines each in :func:`build_proxy` (see the marked
block): they get the runtime (settings, registry, app) and append observers to
``runtime.observers``, set ``runtime.gate``, and register ``runtime.app.on_startup`` /
``on_cleanup`` for their background tasks. Observers are frozen when the app starts.

Order of ``on_request_final``: components in the order they were appended, then the core outputs
(Prometheus metrics, access log, span end), so those see what the components filled in.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from edge_proxy.access_log import AccessLog, create_access_log
from edge_proxy.proxy.app import GENERATION_ROUTES, METADATA_ROUTES, BackendInfo, ProxyCore
from edge_proxy.proxy.backend_probe import probe_loop
from edge_proxy.coldstart.factory import attach_coldstart
from edge_proxy.energy.factory import attach_energy
from edge_proxy.config import Settings
from edge_proxy.proxy.hooks import BackendGate, RequestObserver
from edge_proxy.proxy.http_guard import Guard, guarded_runner
from edge_proxy.metrics import ProxyMetrics
from edge_proxy.tracing import Tracing, create_tracing

log = logging.getLogger("edge_proxy")


@dataclass
class ProxyRuntime:
    settings: Settings
    registry: CollectorRegistry                   # one per runtime (never the global default)
    app: web.Application                          # the proxy (client-facing port)
    metrics_app: web.Application | None           # /metrics on its own port (None: on the main app)
    metrics: ProxyMetrics
    backend: BackendInfo
    core: ProxyCore
    tracing: Tracing | None = None
    access_log: AccessLog | None = None
    observers: list[RequestObserver] = field(default_factory=list)   # components (energy, economics, ...)
    gate: BackendGate | None = None                                  # cold start (hold mode)
    components: dict[str, Any] = field(default_factory=dict)         # name -> component object, for tests/CLI
    # Filled by start():
    port: int | None = None
    metrics_port: int | None = None
    _runners: list[web.AppRunner] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.settings.proxy.host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.settings.proxy.host}:{self.metrics_port}/metrics"

    async def start(self) -> None:
        """Listen on the configured ports (0 = any free port; the bound ones are stored)."""
        ps = self.settings.proxy
        from edge_proxy.proxy.shutdown import CLEANUP_TIMEOUT_SECONDS
        runner = guarded_runner(self.app, self._guard(), handler_cancellation=True, access_log=None,
                                shutdown_timeout=CLEANUP_TIMEOUT_SECONDS)   # after the drain (shutdown.py)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, ps.host, ps.port, backlog=1024)
        await site.start()
        self.port = _bound_port(site)
        if self.metrics_app is not None:
            mrunner = guarded_runner(self.metrics_app, self._guard(), access_log=None)
            await mrunner.setup()
            self._runners.append(mrunner)
            msite = web.TCPSite(mrunner, ps.host, ps.metrics_port or 0)
            await msite.start()
            self.metrics_port = _bound_port(msite)
        else:
            self.metrics_port = self.port

    def _guard(self) -> Guard:
        """Read deadlines and protocol-error answers for the proxy's HTTP connections."""
        ps = self.settings.proxy
        return Guard(header_timeout=ps.request_header_timeout_seconds,
                     body_timeout=ps.request_body_timeout_seconds,
                     api_for_path=self.core.api_for_path)

    async def stop(self) -> None:
        for runner in self._runners:        # the client-facing app first: /metrics answers until the end
            await runner.cleanup()
        self._runners.clear()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)   # flushes spans; never blocks the loop
        if self.access_log is not None:
            self.access_log.close()

    async def drain(self) -> None:
        """Wait until every ended request has been finalized (metrics, log, span emitted)."""
        await self.core.drain()

    def metrics_text(self) -> str:
        return generate_latest(self.registry).decode()


def _bound_port(site: web.TCPSite) -> int:
    server = site._server  # noqa: SLF001 - aiohttp exposes the bound socket only here
    assert server is not None and server.sockets  # type: ignore[union-attr]
    return int(server.sockets[0].getsockname()[1])  # type: ignore[union-attr]


def _metrics_handler(registry: CollectorRegistry) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})
    return handler


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_proxy(settings: Settings, *, span_exporter: Any = None) -> ProxyRuntime:
    """Create the proxy app, the metrics app, the registry and every component from settings.

    ``span_exporter``: tests pass an InMemorySpanExporter (spans then always on).
    """
    ps = settings.proxy
    registry = CollectorRegistry(auto_describe=True)
    backend = BackendInfo(url=ps.backend_url.rstrip("/"),
                          kind=ps.backend_kind if ps.backend_kind != "auto" else "unknown")
    metrics = ProxyMetrics(registry, backend_kind=backend.kind)
    tracing = create_tracing(settings.tracing, exporter=span_exporter, host=ps.host, port=ps.port)
    access_log = create_access_log(ps.access_log)
    outputs: list[RequestObserver] = [metrics]
    if access_log is not None:
        outputs.append(access_log)
    if tracing is not None:
        outputs.append(tracing)
    observers: list[RequestObserver] = []
    app = web.Application(client_max_size=ps.max_body_bytes)
    metrics_app = web.Application() if ps.metrics_port is not None else None
    runtime_box: list[ProxyRuntime] = []
    core = ProxyCore(settings, metrics, tracing, observers, outputs, backend,
                     gate_ref=lambda: runtime_box[0].gate if runtime_box else None)
    runtime = ProxyRuntime(settings=settings, registry=registry, app=app, metrics_app=metrics_app,
                           metrics=metrics, backend=backend, core=core, tracing=tracing,
                           access_log=access_log, observers=observers)
    runtime_box.append(runtime)

    # ---- components: energy, economics, cold start add their lines here -----------------------
    # Each factory gets the runtime; it appends observers to runtime.observers (order = order of
    # on_request_final calls), may set runtime.gate, and registers runtime.app.on_startup/on_cleanup.
    # e.g. edge_proxy.energy.factory.create_energy(runtime)
    attach_energy(runtime)         # energy sampler + ledger (observer first: others read rec.energy)
    from edge_proxy.economics_live import create_economics
    create_economics(runtime)
    attach_coldstart(runtime)      # hold mode / --spawn supervisor (None unless enabled)
    from edge_proxy.proxy.request_lookup import attach_request_lookup
    attach_request_lookup(runtime)  # GET /edge/requests/{id}: per-request energy (edge-eval)
    # ---------------------------------------------------------------------------------------------

    (metrics_app or app).router.add_get("/metrics", _metrics_handler(registry))
    # The proxy's own liveness (Docker HEALTHCHECK, Kubernetes probes): 200 whenever it serves,
    # whatever the backend's state (a gateway must stay Ready while its backend is at zero).
    (metrics_app or app).router.add_get("/healthz", _healthz)
    app.cleanup_ctx.append(_core_ctx(runtime))
    # The instrumented paths as plain resources (resolved by a dict lookup, not the catch-all's
    # regular expression), everything else through the catch-all; the same handler for all.
    for path in (*GENERATION_ROUTES, *sorted(METADATA_ROUTES)):
        app.router.add_route("*", path, core.handle)
    app.router.add_route("*", "/{tail:.*}", core.handle)
    return runtime


def _core_ctx(runtime: ProxyRuntime) -> Callable[[web.Application], AsyncIterator[None]]:
    """Client session and backend probe: up before any component's on_startup, down after."""
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        await runtime.core.on_startup(app)
        task = asyncio.get_running_loop().create_task(
            probe_loop(runtime.core, runtime.backend, runtime.settings.proxy.backend_kind,
                       runtime.metrics))
        yield
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001
            pass
        await runtime.core.on_cleanup(app)
    return ctx
