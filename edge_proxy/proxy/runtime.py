"""``ProxyRuntime``: a built proxy and the resources it owns, as an async context manager.

``async with build_proxy(settings) as rt:`` (or ``await rt.start()`` ... ``await rt.stop()``)
opens the backend client (``ProxyCore.open``), starts the backend probe, runs the apps' start-up
hooks (the components': energy sampler, economics, cold-start gate) and listens; on the way out
it stops listening, drains the ended requests, runs the cleanup hooks, closes the backend
client, flushes the spans and closes the access log, in that order. Owns: the registry, the
apps and their runners, the tracing and access-log outputs. Must not: build components (the
assembly does: ``server.build_proxy``) or handle requests (``app.ProxyCore``).
"""
from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Any, AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from edge_proxy.telemetry.access_log import AccessLog
from edge_proxy.config import Settings
from edge_proxy.telemetry.metrics import ProxyMetrics
from edge_proxy.proxy.app import ProxyCore
from edge_proxy.proxy.backend_probe import BackendInfo, probe_loop
from edge_proxy.proxy.hooks import BackendGate, RequestObserver
from edge_proxy.proxy.http_guard import Guard, guarded_runner
from edge_proxy.proxy.shutdown import CLEANUP_TIMEOUT_SECONDS
from edge_proxy.telemetry.tracing import Tracing


class ProxyRuntime:
    """A proxy built from settings (see :func:`edge_proxy.proxy.server.build_proxy`)."""

    def __init__(self, settings: Settings, registry: CollectorRegistry, app: web.Application,
                 metrics_app: web.Application | None, metrics: ProxyMetrics, backend: BackendInfo,
                 core: ProxyCore, tracing: Tracing | None = None,
                 access_log: AccessLog | None = None) -> None:
        self.settings = settings
        self.registry = registry            # one per runtime (never the global default)
        self.app = app                      # the proxy (client-facing port)
        self.metrics_app = metrics_app      # /metrics on its own port (None: on the main app)
        self.metrics = metrics
        self.backend = backend
        self.core = core
        self.tracing = tracing
        self.access_log = access_log
        # components (energy, economics, ...), in the order of their on_request_final calls;
        # the list may grow until start()
        self.observers: list[RequestObserver] = core.book.observers
        # name -> component object, for tests and the CLI (components never look each other up
        # here: the assembly hands them what they need)
        self.components: dict[str, Any] = {}
        self.port: int | None = None        # bound by start()
        self.metrics_port: int | None = None
        self._runners: list[web.AppRunner] = []
        self._stopped = False
        app.cleanup_ctx.append(self._core_ctx)

    @property
    def gate(self) -> BackendGate | None:
        """The cold-start gate (hold mode), or None; set it before :meth:`start`."""
        return self.core.gate

    @gate.setter
    def gate(self, gate: BackendGate | None) -> None:
        self.core.gate = gate

    @property
    def url(self) -> str:
        return f"http://{self.settings.proxy.host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.settings.proxy.host}:{self.metrics_port}/metrics"

    async def __aenter__(self) -> "ProxyRuntime":
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        """Listen on the configured ports (0 = any free port; the bound ones are stored)."""
        ps = self.settings.proxy
        await self.core.open()
        runner = guarded_runner(self.app, self._guard(), handler_cancellation=True, access_log=None,
                                shutdown_timeout=CLEANUP_TIMEOUT_SECONDS)   # after the drain (shutdown.py)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, ps.host, ps.port, backlog=1024, reuse_port=ps.reuse_port or None)
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

    async def _core_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """The backend probe, up before any component's on_startup; at cleanup (before the
        components' on_cleanup) the probe stops and the ended requests are drained."""
        assert self.core.session is not None
        task = asyncio.get_running_loop().create_task(
            probe_loop(self.core.session, self.backend, self.settings, self.metrics))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await self.core.drain()

    async def stop(self) -> None:
        """Stop listening and release everything (safe to call twice, or after a failed start)."""
        for runner in self._runners:        # the client-facing app first: /metrics answers until the end
            await runner.cleanup()
        self._runners.clear()
        await self.core.close()
        if self._stopped:
            return
        self._stopped = True
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
