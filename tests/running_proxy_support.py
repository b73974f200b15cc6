"""Test support for the proxy under test, in-process: ``running_proxy`` (a started edge-proxy on free ports
in front of a given backend, with a ``RecordingObserver`` as its "recorder" component) and
``RecordingObserver`` itself (records the observer calls and the final request records).

Used by the proxy tests next to the fake upstream of tests/proxy_support.py. Must NOT hold tests or
fixtures, nor the fake upstream (proxy_support.py runs it, also as a subprocess).
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from edge_proxy.config import load_settings
from edge_proxy.proxy.hooks import BaseObserver, RequestRecord


class RecordingObserver(BaseObserver):
    """Records the observer calls (a stand-in for a component plugged in through build_proxy)."""

    def __init__(self) -> None:
        self.calls: dict[str, list[str]] = {}
        self.tokens: dict[str, list[tuple[int, int]]] = {}
        self.final: list[RequestRecord] = []

    def _log(self, rec: RequestRecord, what: str) -> None:
        self.calls.setdefault(rec.request_id, []).append(what)

    def on_request_start(self, rec: RequestRecord) -> None:
        self._log(rec, "start")

    def on_tokens(self, rec: RequestRecord, n: int, t_ns: int) -> None:
        self._log(rec, "tokens")
        self.tokens.setdefault(rec.request_id, []).append((n, t_ns))

    def on_request_end(self, rec: RequestRecord) -> None:
        self._log(rec, "end")

    async def finalize(self, rec: RequestRecord) -> None:
        await asyncio.sleep(0.001)
        self._log(rec, "finalize")

    def on_request_final(self, rec: RequestRecord) -> None:
        self._log(rec, "final")
        self.final.append(rec)


@asynccontextmanager
async def running_proxy(backend_url: str, span_exporter: Any = None, gate: Any = None,
                        **proxy: Any) -> AsyncIterator[Any]:
    """A started proxy (free ports, no access log unless given) with a RecordingObserver."""
    from edge_proxy.proxy.server import build_proxy

    overrides = {("proxy", "backend_url"): backend_url, ("proxy", "port"): 0,
                 ("proxy", "metrics_port"): 0, ("proxy", "access_log"): "none"}
    for k, v in proxy.items():
        overrides[("proxy", k)] = v
    settings = load_settings(None, overrides, environ={})
    runtime = build_proxy(settings, span_exporter=span_exporter)
    rec_obs = RecordingObserver()
    runtime.observers.append(rec_obs)
    if gate is not None:
        runtime.gate = gate
    runtime.components["recorder"] = rec_obs
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()
