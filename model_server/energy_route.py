"""``GET /energy``: the model server's GPU energy counters, for proxies on another host.

Answer (JSON)::

    {"source": "nvml" | "none",
     "instance_id": "3f1c..",                # new on every process start (a restart or a moved pod)
     "boot_id": "9b2e..", "pid": 1,          # the node's boot id (Linux) and this process's id
     "now_monotonic_seconds": 1234.5,        # this process's monotonic clock, to align samples
     "now_epoch_seconds": 1764150000.1,
     "gpus": [{"uuid": "GPU-..", "energy_millijoules": 123456789, "power_watts": 74.9}],
     "samples": [{"t_monotonic_seconds": 1234.4, "energy_millijoules": {"GPU-..": 123456789}}, ...]}

``samples`` is the recent ring (at most 600 samples, oldest first); ``?since=T`` returns only
samples newer than T (what the proxy's remote source asks for). The sampler is the proxy's own
(``edge_proxy.energy.Sampler``: one background thread, 100 ms, bounded ring) and starts on the
first ``GET /energy`` (so a server nobody polls pays nothing), or never with
``MODEL_SERVER_ENERGY_SAMPLER=off``. Without NVML or GPUs the answer is ``source: "none"`` with
empty lists; this route never fails.

Restarts: monotonic times and GPU UUIDs only mean something within one process on one node. When
the pod moves (scale-to-zero brings it back on a fresh node), ``instance_id`` changes and the
proxy's remote source (``edge_proxy.energy.remote_source``) drops its clock offsets, its ``since``
and its GPU list and starts over.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

log = logging.getLogger(__name__)

MAX_SAMPLES = 600
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str | None:
    """The node's boot id (Linux; None elsewhere): changes on every boot."""
    try:
        return BOOT_ID_PATH.read_text().strip() or None
    except OSError:
        return None
ENV_SWITCH = "MODEL_SERVER_ENERGY_SAMPLER"      # "off" disables the sampler


class EnergyService:
    """Lazily started NVML sampler for the /energy route."""

    def __init__(self, gpu_uuids: list[str] | None, period_seconds: float = 0.1, ring_size: int = 1200,
                 reader_factory: Callable[[list[str]], Any] | None = None,
                 clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self.gpu_uuids = list(gpu_uuids or [])
        self.clock_ns = clock_ns                 # the sampler's clock (tests: another node's clock)
        self.instance_id = uuid.uuid4().hex      # this process's run of the route: new on restart
        self.boot_id = boot_id()
        self.reader_factory = reader_factory     # tests: a replay reader (CI has no NVML)
        self.period_seconds = period_seconds
        self.ring_size = ring_size
        self.sampler: Any = None
        self.source = "none"
        self.reason = "not started"
        self._lock = threading.Lock()
        self._tried = False

    def ensure_started(self) -> None:
        """Start the sampler once (blocking: NVML init; call from a worker thread)."""
        with self._lock:
            if self._tried:
                return
            self._tried = True
            if os.environ.get(ENV_SWITCH, "").lower() in ("off", "0", "false", "no"):
                self.reason = f"disabled by {ENV_SWITCH}"
                return
            if not self.gpu_uuids:
                self.reason = "no GPU configured"
                return
            try:
                from edge_proxy.energy import NvmlReader, Sampler

                reader = (self.reader_factory or NvmlReader)(self.gpu_uuids)
                self.sampler = Sampler(reader, self.period_seconds, self.ring_size)
                self.sampler.start()
                self.source = "nvml" if self.reader_factory is None else reader.source
                self.reason = "ok"
            except Exception as exc:  # noqa: BLE001 - /energy must never fail the server
                self.reason = str(exc)
                log.warning("GET /energy: no GPU energy counter (%s); answering source none", exc)

    def stop(self) -> None:
        with self._lock:
            if self.sampler is not None:
                self.sampler.stop()
                self.sampler = None
                self.source = "none"

    def snapshot(self, since: float | None) -> dict[str, Any]:
        now_mono, now_epoch = self.clock_ns() / 1e9, time.time()
        out: dict[str, Any] = {"source": self.source, "instance_id": self.instance_id,
                               "boot_id": self.boot_id, "pid": os.getpid(),
                               "now_monotonic_seconds": now_mono,
                               "now_epoch_seconds": now_epoch, "gpus": [], "samples": []}
        sampler = self.sampler
        if sampler is None:
            out["source"] = "none"
            out["reason"] = self.reason
            return out
        since_ns = None if since is None else int(since * 1e9)
        readings = sampler.recent_readings(since_ns, MAX_SAMPLES)
        latest = sampler.latest_counters()
        power = sampler.snapshot()["power_watts"]
        out["gpus"] = [{"uuid": u, "energy_millijoules": latest.get(u), "power_watts": power.get(u)}
                       for u in sampler.reader.gpu_uuids]
        out["samples"] = [{"t_monotonic_seconds": r.t_ns / 1e9, "energy_millijoules": dict(r.energy_mj)}
                          for r in readings]
        return out


ENERGY_SERVICE_KEY = web.AppKey("energy_service", EnergyService)


def register_energy_routes(app: web.Application, gpu_uuids: list[str] | None = None, *,
                           reader_factory: Callable[[list[str]], Any] | None = None,
                           period_seconds: float = 0.1,
                           clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
    """Add ``GET /energy`` to the model server's app (sampler stopped on app cleanup).
    ``reader_factory`` replaces NVML (tests replay a trace); the answer then names that source.
    ``clock_ns`` is the clock the answer's ``now_monotonic_seconds`` is read from (the readers' own)."""
    service = EnergyService(gpu_uuids, period_seconds, reader_factory=reader_factory, clock_ns=clock_ns)
    app[ENERGY_SERVICE_KEY] = service

    async def energy(request: web.Request) -> web.Response:
        try:
            since_raw = request.query.get("since")
            since = float(since_raw) if since_raw not in (None, "") else None
        except ValueError:
            return web.json_response({"error": "since must be a number (seconds, server monotonic clock)"},
                                     status=400)
        try:
            if not service._tried:
                await asyncio.get_running_loop().run_in_executor(None, service.ensure_started)
            return web.json_response(service.snapshot(since))
        except Exception as exc:  # noqa: BLE001 - never fail
            log.warning("GET /energy failed: %s", exc)
            return web.json_response({"source": "none", "instance_id": service.instance_id,
                                      "now_monotonic_seconds": service.clock_ns() / 1e9,
                                      "now_epoch_seconds": time.time(), "gpus": [], "samples": [],
                                      "reason": str(exc)})

    async def cleanup(_app: web.Application) -> None:
        await asyncio.get_running_loop().run_in_executor(None, service.stop)

    app.router.add_get("/energy", energy)
    app.on_cleanup.append(cleanup)
