"""Assembly of the energy component from settings: source -> sampler thread -> ledger -> observer,
Prometheus collector, aiohttp start/stop hooks.

``energy.source``: ``auto`` (nvml when NVML initialises, else estimated; logged at start-up),
``nvml``, ``remote`` (``energy.remote_url``, default: the proxy's backend URL), ``replay``
(``energy.replay_path``), ``estimated`` (``energy.estimated_watts`` per busy CPU core), ``none``.
``energy.shared_path`` (several proxy processes on one host, one GPU counter): the source is wrapped
in :class:`~edge_proxy.energy.shared_source.SharedReader` and the proxy's requests in flight are
published in the activity table at that path; a replayed trace then starts at the table's creation,
so every proxy on the table replays the same counter.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable

from prometheus_client import CollectorRegistry

from edge_proxy.config import ConfigError, EnergySettings, Settings
from edge_proxy.energy.apportion import METHODS
from edge_proxy.energy.estimated_source import SCOPES as ESTIMATED_SCOPES, EstimatedReader
from edge_proxy.energy.exporter import register_energy_metrics, register_phase_histogram
from edge_proxy.energy.ledger import Ledger
from edge_proxy.energy.observer import EnergyObserver
from edge_proxy.energy.readings import EnergyReader, ReaderError, Tick
from edge_proxy.energy.sampler import Sampler

log = logging.getLogger("edge_proxy.energy")

SOURCES = ("auto", "nvml", "remote", "replay", "estimated", "none")


def validate(es: EnergySettings) -> None:
    if es.source not in SOURCES:
        raise ConfigError(f"energy.source must be one of {', '.join(SOURCES)}, got {es.source!r}")
    if not es.period_seconds > 0:
        raise ConfigError(f"energy.period_seconds must be > 0, got {es.period_seconds}")
    if es.attribution not in METHODS:
        raise ConfigError(f"energy.attribution must be one of {', '.join(METHODS)}, got {es.attribution!r}")
    if es.idle_watts is not None and es.idle_watts < 0:
        raise ConfigError(f"energy.idle_watts must be >= 0, got {es.idle_watts}")
    if es.prefill_weight < 0:
        raise ConfigError(f"energy.prefill_weight must be >= 0, got {es.prefill_weight}")
    if not es.estimated_watts > 0:
        raise ConfigError(f"energy.estimated_watts must be > 0, got {es.estimated_watts}")
    if es.estimated_scope not in ESTIMATED_SCOPES:
        raise ConfigError(f"energy.estimated_scope must be one of {', '.join(ESTIMATED_SCOPES)}, "
                          f"got {es.estimated_scope!r}")
    if es.ring_size < 2:
        raise ConfigError(f"energy.ring_size must be >= 2, got {es.ring_size}")
    if es.source == "replay" and not es.replay_path:
        raise ConfigError("energy.source=replay needs energy.replay_path (a trace from `edge-proxy record`)")
    if es.shared_path is not None and es.source == "none":
        raise ConfigError("energy.shared_path needs an energy source (it shares one), got energy.source=none")


def _estimated(settings: Settings) -> EstimatedReader:
    es = settings.energy
    return EstimatedReader(es.estimated_watts, scope=es.estimated_scope, backend_url=settings.proxy.backend_url)


def make_reader(settings: Settings, replay_origin_ns: int | None = None) -> tuple[EnergyReader, str]:
    """The configured reader and a one-line note on how it was chosen. Raises ConfigError."""
    es = settings.energy
    uuids = list(es.gpu_uuids)
    try:
        if es.source == "auto":
            from edge_proxy.energy.nvml_source import NvmlReader
            try:
                r: EnergyReader = NvmlReader(uuids or None)
                return r, f"auto -> nvml ({len(r.gpu_uuids)} GPU(s): {', '.join(r.gpu_uuids)})"
            except ReaderError as exc:
                return _estimated(settings), (
                    f"auto -> estimated ({exc}; modelled as busy CPU seconds x {es.estimated_watts:g} W, "
                    f"scope {es.estimated_scope}, labelled source=\"estimated\")")
        if es.source == "nvml":
            from edge_proxy.energy.nvml_source import NvmlReader
            r = NvmlReader(uuids or None)
            return r, f"nvml ({len(r.gpu_uuids)} GPU(s): {', '.join(r.gpu_uuids)})"
        if es.source == "remote":
            from edge_proxy.energy.remote_source import RemoteReader
            url = es.remote_url or settings.proxy.backend_url
            return RemoteReader(url, uuids or None, timeout_seconds=max(0.5, 5 * es.period_seconds)), \
                f"remote (polling {url.rstrip('/')}/energy)"
        if es.source == "replay":
            from edge_proxy.energy.replay_source import ReplayReader
            assert es.replay_path
            rr = ReplayReader(es.replay_path, mode="realtime", loop=True, gpu_uuids=uuids or None,
                              origin_ns=replay_origin_ns)
            while replay_origin_ns is not None and len(rr.read()) >= 10_000:
                pass                            # a shared origin in the past: skip what is already due
            return rr, f"replay ({es.replay_path}, real time, looping)"
        if es.source == "estimated":
            return _estimated(settings), \
                f"estimated (busy CPU seconds x {es.estimated_watts:g} W, scope {es.estimated_scope}; not a measurement)"
    except ReaderError as exc:
        raise ConfigError(f"energy source {es.source}: {exc}") from None
    raise ConfigError(f"energy.source {es.source!r} is not supported")


@dataclass
class EnergyComponent:
    """What the proxy holds: the running parts plus queries for other components (cold start)."""

    source: str
    note: str
    sampler: Sampler
    ledger: Ledger
    observer: EnergyObserver
    activity: Any = None          # SharedActivityObserver with energy.shared_path, else None

    def start(self) -> None:
        log.info("energy source: %s", self.note)
        print(f"edge-proxy: energy source: {self.note}", file=sys.stderr, flush=True)
        self.sampler.add_listener(self.ledger.add_tick)
        self.sampler.start()

    def stop(self) -> None:
        self.sampler.stop()
        self.ledger.flush()

    async def on_startup(self, app: Any) -> None:
        self.start()

    async def on_cleanup(self, app: Any) -> None:
        self.stop()

    # queries used by the cold-start component (its energy windows read ticks_between)
    @property
    def idle_watts(self) -> float | None:
        w = self.ledger.idle_watts
        return w if w > 0 else None

    def ticks_between(self, a_ns: int, b_ns: int) -> list[Tick]:
        return self.sampler.ticks_between(a_ns, b_ns)


def create_energy(settings: Settings, registry: CollectorRegistry) -> EnergyComponent | None:
    """Build the energy component (not started). None when ``energy.source`` is ``none``."""
    es = settings.energy
    validate(es)
    if es.source == "none":
        return None
    table = None
    if es.shared_path is not None:
        from edge_proxy.energy.shared_table import ActivityTable, TableError
        try:
            table = ActivityTable(es.shared_path)
        except TableError as exc:
            raise ConfigError(f"energy.shared_path: {exc}") from None
    try:
        reader, note = make_reader(settings, None if table is None else table.created_ns)
    except ConfigError:
        if table is not None:
            table.close()
        raise
    if table is not None:
        from edge_proxy.energy.shared_source import SharedReader
        reader = SharedReader(reader, table)
        note += f"; shared with the other proxies on {es.shared_path} (slot {table.slot}: this proxy's share only)"
    sampler = Sampler(reader, es.period_seconds, es.ring_size)
    ledger = Ledger(idle_watts=es.idle_watts, prefill_weight=es.prefill_weight, method=es.attribution,
                    max_defer_seconds=getattr(es, "max_defer_seconds", 30.0),
                    max_pending_ticks=es.ring_size)
    histogram = register_energy_metrics(registry, ledger, sampler)
    observer = EnergyObserver(ledger, reader.source, es.period_seconds, histogram,
                              response_header=getattr(es, "response_header", False),
                              phase_histogram=register_phase_histogram(registry))
    comp = EnergyComponent(reader.source, note, sampler, ledger, observer)
    if table is not None:
        from edge_proxy.energy.shared_source import SharedActivityObserver
        comp.activity = SharedActivityObserver(table)
    return comp


def attach_energy(runtime: Any) -> EnergyComponent | None:
    """``build_proxy`` hook: create the component, add its observer (first, so later components
    see ``rec.energy``), start/stop the sampler with the app, name it
    ``runtime.components["energy"]`` (for tests and the CLI)."""
    comp = create_energy(runtime.settings, runtime.registry)
    if comp is None:
        return None
    runtime.observers.insert(0, comp.observer)
    if comp.activity is not None:
        runtime.observers.insert(0, comp.activity)
    runtime.components["energy"] = comp
    runtime.app.on_startup.append(comp.on_startup)
    runtime.app.on_cleanup.append(comp.on_cleanup)
    return comp


def follow_spawned_backend(comp: EnergyComponent | None, pid: Callable[[], int | None]) -> None:
    """``build_proxy`` hook (``--spawn``): the backend the proxy spawns is the estimated source's
    process tree; ``pid()`` (looked up when read) is its process id, None while none runs."""
    if comp is not None and isinstance(comp.sampler.reader, EstimatedReader):
        comp.sampler.reader.spawned_pid = pid
