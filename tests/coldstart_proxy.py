"""Test support for the cold-start tests: a real proxy (``build_proxy``) on its own event-loop
thread, so tests can use the real synchronous clients (openai, text_generation, requests)."""
from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from edge_proxy.config import Settings
from edge_proxy.proxy.server import ProxyRuntime, build_proxy


class ProxyThread:
    def __init__(self, settings: Settings, span_exporter: Any = None) -> None:
        settings.proxy.port = 0
        settings.proxy.metrics_port = None
        settings.proxy.access_log = None
        self.settings = settings
        self.span_exporter = span_exporter
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="proxy-loop", daemon=True)
        self.runtime: ProxyRuntime | None = None

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> "ProxyThread":
        self.thread.start()

        async def build() -> ProxyRuntime:
            rt = build_proxy(self.settings, span_exporter=self.span_exporter)
            await rt.start()
            return rt

        self.runtime = self.call(build())
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.runtime is not None:
                self.call(self.runtime.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    @property
    def url(self) -> str:
        assert self.runtime is not None
        return self.runtime.url

    @property
    def gate(self) -> Any:
        assert self.runtime is not None
        return self.runtime.gate

    def snapshot(self) -> dict[str, Any]:
        async def snap() -> dict[str, Any]:
            return self.gate.snapshot()
        return self.call(snap())

    def metric(self, name: str, **labels: str) -> float:
        assert self.runtime is not None
        v = self.runtime.registry.get_sample_value(name, labels or None)
        return 0.0 if v is None else v

    def drain(self) -> None:
        assert self.runtime is not None
        self.call(self.runtime.drain())


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
