"""Assembly: build the cold-start gate from settings and hook it into the proxy's aiohttp app."""
from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from edge_proxy.coldstart.gate import ColdStartGate
from edge_proxy.coldstart.metrics import ColdStartMetrics
from edge_proxy.coldstart.spawn import SpawnError, build_argv
from edge_proxy.config import ConfigError, Settings
from edge_proxy.proxy.hooks import RequestRecord

COLD_START_HEADER = "x-edge-cold-start"
COLD_START_WAIT_HEADER = "x-edge-cold-start-wait-seconds"
SNAPSHOT_PATH = "/edge/cold-starts"
PENDING_PATH = "/edge/pending"


def validate(settings: Settings) -> None:
    """One-line ConfigErrors for bad cold-start settings (called before anything starts)."""
    cs = settings.coldstart
    if cs.spawn is not None:
        try:
            build_argv(cs.spawn, "127.0.0.1", 0)
        except SpawnError as exc:
            raise ConfigError(f"--spawn: {exc}") from None
    if cs.max_pending < 1:
        raise ConfigError("coldstart.max_pending must be >= 1")
    if cs.max_wait_seconds <= 0:
        raise ConfigError("coldstart.max_wait_seconds must be > 0")
    if cs.idle_timeout_seconds is not None and cs.idle_timeout_seconds <= 0:
        raise ConfigError("coldstart.idle_timeout_seconds must be > 0")
    if cs.idle_timeout_seconds is not None and cs.spawn is None:
        raise ConfigError("--idle-timeout needs --spawn (the proxy can only stop a backend it started)")
    if cs.max_held_bytes < 1 or cs.drain_seconds < 0 or cs.retry_after_seconds < 0:
        raise ConfigError("coldstart: max_held_bytes >= 1, drain_seconds >= 0, retry_after_seconds >= 0")
    if cs.readiness_poll_seconds <= 0 or cs.release_burst < 1 or cs.stop_grace_seconds < 0:
        raise ConfigError("coldstart: readiness_poll_seconds > 0, release_burst >= 1, stop_grace_seconds >= 0")


def create_coldstart(settings: Settings, registry: CollectorRegistry, tracer: Any = None,
                     energy: Any = None) -> ColdStartGate | None:
    """The gate when hold mode is on (``--hold`` or ``--spawn``), else None (a down backend is a
    502 at once). ``tracer``: an OpenTelemetry tracer (or None: no cold-start spans); ``energy``:
    the energy component (or None)."""
    cs = settings.coldstart
    validate(settings)
    if not (cs.hold or cs.spawn or cs.watch_startup):
        return None
    return ColdStartGate(
        cs, settings.proxy.backend_url, ColdStartMetrics(registry), tracer=tracer, energy=energy,
        idle_watts_configured=settings.energy.idle_watts,
    )


def attach_coldstart(runtime: Any, gate: ColdStartGate | None) -> ColdStartGate | None:
    """``build_proxy`` hook: make ``gate`` (from :func:`create_coldstart`; None: nothing to do)
    the runtime's gate and an observer, tie it to the app's start/stop, and serve its JSON
    snapshot on the metrics port (``GET /edge/cold-starts``)."""
    if gate is None:
        return None
    if runtime.settings.coldstart.hold or runtime.settings.coldstart.spawn:
        runtime.gate = gate            # --watch-startup alone records the start-up, never holds
    runtime.observers.append(gate)
    runtime.components["coldstart"] = gate
    install(runtime.app, gate, snapshot_app=getattr(runtime, "metrics_app", None) or runtime.app)
    return gate


def install(app: web.Application, gate: ColdStartGate | None,
            snapshot_app: web.Application | None = None) -> None:
    """Start/stop the gate with the app (the backend process goes down with the proxy) and serve
    ``GET /edge/cold-starts`` (JSON: pending, process, recent cold starts with phases and tax)."""
    if gate is None:
        return

    async def _start(_app: web.Application) -> None:
        await gate.start()

    async def _shutdown(_app: web.Application) -> None:
        await gate.shutdown()

    async def _stop(_app: web.Application) -> None:
        await gate.close()

    app.on_startup.append(_start)
    app.on_shutdown.append(_shutdown)
    app.on_cleanup.append(_stop)
    async def _snapshot(_req: web.Request) -> web.Response:
        return web.json_response(gate.snapshot())

    async def _pending(_req: web.Request) -> web.Response:
        return web.json_response(pending_snapshot(gate))

    (snapshot_app or app).router.add_get(SNAPSHOT_PATH, _snapshot)
    (snapshot_app or app).router.add_get(PENDING_PATH, _pending)


def pending_snapshot(gate: ColdStartGate) -> dict[str, Any]:
    """``GET /edge/pending`` (metrics port): the demand KEDA scales on, read from the gateway itself
    (KEDA's metrics-api scaler) so that no Prometheus sits in the wake-up path.

    ``demand_requests`` = requests the gateway has open: held ones plus ones at the backend (a held
    request is already open, so it is counted once, never pending + in flight). Measured."""
    return {"demand_requests": gate.in_flight, "pending_requests": gate.pending,
            "held_request_bytes": gate.held_bytes, "backend_ready": gate.ready, "source": "measured"}


def cold_start_headers(rec: RequestRecord) -> dict[str, str]:
    """Response headers for a request that waited for a cold start (empty otherwise)."""
    if not rec.cold_start:
        return {}
    wait = rec.cold_start_wait_seconds or 0.0
    return {COLD_START_HEADER: "true", COLD_START_WAIT_HEADER: f"{wait:.3f}"}
