"""Assembly: ``build_proxy(settings) -> ProxyRuntime`` (start it with ``async with``).

Builds the core outputs (Prometheus metrics, access log, tracing), the core, the runtime, and the
components, each handed what it depends on in its constructor (the energy component to the
cold-start gate and to economics, the gate to economics): components never look each other up.
Other components plug in HERE, in the marked block of :func:`build_proxy`: they append observers
to ``runtime.observers`` and register ``runtime.app.on_startup`` / ``on_cleanup`` for their
background tasks. Observers are frozen when the runtime starts.

Order of ``on_request_final``: components in the order they were appended, then the core outputs
(Prometheus metrics, access log, span end), so those see what the components filled in.
Must not: handle requests (``app``), own resources at run time (``runtime``).
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from edge_proxy.telemetry.access_log import create_access_log
from edge_proxy.telemetry.gc_pause import attach_gc_pause
from edge_proxy.telemetry.loop_lag import attach_loop_lag
from edge_proxy.coldstart.factory import attach_coldstart, create_coldstart
from edge_proxy.config import Settings
from edge_proxy.economics.live import create_economics
from edge_proxy.energy.factory import attach_energy, follow_spawned_backend
from edge_proxy.telemetry.metrics import ProxyMetrics
from edge_proxy.proxy.app import ProxyCore
from edge_proxy.proxy.backend_probe import BackendInfo
from edge_proxy.proxy.forward_routes import GENERATION_ROUTES, METADATA_ROUTES
from edge_proxy.proxy.hooks import RequestObserver
from edge_proxy.proxy.request_lookup import attach_request_lookup
from edge_proxy.proxy.runtime import ProxyRuntime
from edge_proxy.telemetry.tracing import create_tracing

__all__ = ["ProxyRuntime", "build_proxy"]


def _metrics_handler(registry: CollectorRegistry) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        # the format the scraper asks for: OpenMetrics for Prometheus (counters' _created as created timestamps),
        # else the classic text format
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(registry), headers={"Content-Type": content_type})
    return handler


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_proxy(settings: Settings, *, span_exporter: Any = None) -> ProxyRuntime:
    """Create the proxy app, the metrics app, the registry and every component from settings
    (nothing is started: see :class:`ProxyRuntime`).

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
    app = web.Application(client_max_size=ps.max_body_bytes)
    metrics_app = web.Application() if ps.metrics_port is not None else None
    core = ProxyCore(settings, metrics, tracing, [], outputs, backend)
    runtime = ProxyRuntime(settings, registry, app, metrics_app, metrics, backend, core,
                           tracing=tracing, access_log=access_log)

    # ---- components: energy, cold start, economics add their lines here -----------------------
    # Each factory gets the runtime (settings, registry, apps, observers) and the components it
    # depends on; it appends its observer to runtime.observers (order = order of on_request_final
    # calls) and registers runtime.app.on_startup/on_cleanup.
    energy = attach_energy(runtime)   # sampler + ledger (observer first: others read rec.energy)
    gate = create_coldstart(settings, registry, energy=energy,   # hold mode / --spawn, else None
                            tracer=tracing.tracer if tracing is not None else None)
    if gate is not None and gate.supervisor is not None:   # --spawn: the estimate follows that process
        follow_spawned_backend(energy, lambda sup=gate.supervisor: sup.pid)
    create_economics(runtime, coldstart=gate, energy=energy)
    attach_coldstart(runtime, gate)   # the runtime's gate; its observer after economics'
    attach_request_lookup(runtime)  # GET /edge/requests/{id}: per-request energy (edge-eval)
    attach_loop_lag(runtime)        # edge_proxy_event_loop_lag_seconds
    attach_gc_pause(runtime)        # edge_proxy_gc_pause_seconds{generation}
    # ---------------------------------------------------------------------------------------------

    (metrics_app or app).router.add_get("/metrics", _metrics_handler(registry))
    # The proxy's own liveness (Docker HEALTHCHECK, Kubernetes probes): 200 whenever it serves,
    # whatever the backend's state (a gateway must stay Ready while its backend is at zero).
    (metrics_app or app).router.add_get("/healthz", _healthz)
    # The instrumented paths as plain resources (resolved by a dict lookup, not the catch-all's
    # regular expression), everything else through the catch-all; the same handler for all.
    for path in (*GENERATION_ROUTES, *sorted(METADATA_ROUTES)):
        app.router.add_route("*", path, core.handle)
    app.router.add_route("*", "/{tail:.*}", core.handle)
    return runtime
