"""Reload the price sheet (the ``economics`` section) without a restart: on SIGHUP, and when the
config file changes (polled; a Kubernetes ConfigMap volume swaps the file behind a symlink, which
changes the resolved file's inode and mtime).

Only the keys in :data:`RELOADABLE` take effect live (prices, fixed costs, scores, weight sizes);
every request priced after the reload uses them, earlier requests keep the prices they were priced
with (counters are never rewritten). A change to any other key of any section is logged as needing
a restart and ignored. A file that does not load (bad YAML, a bad value) is logged in one line and
the running prices stay. Outcomes are counted in ``edge_proxy_config_reloads_total{outcome}``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
from pathlib import Path
from typing import Any, Mapping

from prometheus_client import CollectorRegistry, Counter

from edge_proxy.config import ConfigError, load_settings

log = logging.getLogger("edge_proxy.reload")

RELOADABLE = ("usd_per_kwh", "pue", "gpu_usd_per_hour", "api_usd_per_million_input_tokens",
              "api_usd_per_million_output_tokens", "api_cost_per_request_usd", "adaptation_joules",
              "adaptation_kwh", "adaptation_usd", "setup_usd", "scores", "reference_scores",
              "model_gigabytes")
OUTCOMES = ("applied", "unchanged", "failed")


def _fingerprint(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)                      # follows the symlink a ConfigMap volume uses
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class EconomicsReloader:
    """Re-reads ``config_file`` (with the same command-line overrides) into the running economics
    observer. ``economics`` is the :class:`~edge_proxy.economics.live.EconomicsObserver`."""

    def __init__(self, economics: Any, config_file: str | Path, overrides: Mapping[tuple[str, str], Any],
                 registry: CollectorRegistry, poll_seconds: float = 5.0) -> None:
        self.economics = economics
        self.path = Path(config_file)
        self.overrides = dict(overrides)
        self.poll_seconds = poll_seconds
        self.reloads = Counter("edge_proxy_config_reloads", "Reloads of the economics section "
                               "(SIGHUP or config file change), by outcome.", ["outcome"], registry=registry)
        for o in OUTCOMES:
            self.reloads.labels(outcome=o)
        self._seen = _fingerprint(self.path)
        self._task: asyncio.Task[None] | None = None

    def reload(self) -> str:
        """Apply the file's reloadable economics keys now; returns the outcome."""
        self._seen = _fingerprint(self.path)
        try:
            new = load_settings(self.path, self.overrides)
        except ConfigError as exc:
            log.warning("config reload failed, prices unchanged: %s", exc)
            self.reloads.labels(outcome="failed").inc()
            return "failed"
        old = self.economics.cfg
        changed = {k: getattr(new.economics, k) for k in RELOADABLE
                   if getattr(new.economics, k) != getattr(old, k)}
        ignored = sorted(f"economics.{f.name}" for f in dataclasses.fields(old)
                         if f.name not in RELOADABLE and getattr(new.economics, f.name) != getattr(old, f.name))
        settings = self.economics.settings
        for section in dataclasses.fields(settings):
            if section.name != "economics" and getattr(new, section.name) != getattr(settings, section.name):
                ignored.append(section.name)
        if ignored:
            log.warning("config reload: %s changed but needs a restart; not applied", ", ".join(ignored))
        if not changed:
            self.reloads.labels(outcome="unchanged").inc()
            return "unchanged"
        cfg = dataclasses.replace(old, **changed)
        self.economics.cfg = cfg
        settings.economics = cfg
        log.warning("config reload: economics %s applied", ", ".join(sorted(changed)))
        self.reloads.labels(outcome="applied").inc()
        return "applied"

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            fp = _fingerprint(self.path)
            if fp is not None and fp != self._seen:
                self.reload()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """SIGHUP handler and the file watch (call inside the running loop)."""
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._task = loop.create_task(self._watch(), name="economics-reload")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
