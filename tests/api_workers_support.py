"""Test support for ``serve --api-workers N`` servers: reading a metric from /metrics, waiting until the
engine is idle or until N distinct API workers said ready, and the holder of a module's shared
``--api-workers 2`` server (started once, taken by a test that ends it).

Used by tests/test_model_server_api_workers.py. Must NOT hold tests or fixtures (the test module wraps
``_WorkersServers`` in its own module fixtures).
"""
from __future__ import annotations

import contextlib
import re

import requests

from tests.conftest import ModelServerProcess, start_model_server
from tests.net_support import wait_until


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _metrics(url: str) -> str:
    return requests.get(url + "/metrics", timeout=10).text


def _engine_idle(url: str) -> bool:
    try:
        text = _metrics(url)
    except requests.ConnectionError:    # a connection the kernel gave a worker that was dying: reset
        return False
    return (_metric(text, "model_server_engine_running_requests") == 0
            and _metric(text, "model_server_engine_waiting_requests") == 0)


def _wait_workers_ready(url: str, n: int, timeout: float = 60.0) -> None:
    """Each API worker has its own state ("loading" while its own tokenizer loads, when another one may already
    answer /health with 200): wait until ``n`` distinct workers said ready, asking on fresh connections (the
    kernel hands each to one of them)."""
    ready: set[int] = set()

    def poll() -> bool:
        info = requests.get(url + "/info", timeout=10, headers={"Connection": "close"}).json()
        if info.get("ready") is True:
            ready.add(info["api_worker_pid"])
        return len(ready) >= n
    assert wait_until(poll, timeout, interval=0.02), f"only the API workers {sorted(ready)} said ready"


class _WorkersServers:
    """The module's ``--api-workers 2`` server (fast engine, max batch 8), started once and shared by the tests
    that leave it running; a test that ends it (kills its engine, SIGTERMs it) takes it, and the next test that
    needs one starts a fresh one. In file order the server the ending tests use is one that already served."""

    def __init__(self, model_dir: str) -> None:
        self.model_dir = model_dir
        self._stack: contextlib.ExitStack | None = None
        self._server: ModelServerProcess | None = None

    def get(self) -> ModelServerProcess:
        if self._server is None or self._server.proc.poll() is not None:
            self.close()
            stack = contextlib.ExitStack()
            try:
                server = stack.enter_context(start_model_server(
                    self.model_dir, "--engine", "fast", "--api-workers", "2", "--max-batch", "8"))
                _wait_workers_ready(server.url, 2)
            except BaseException:
                stack.close()
                raise
            self._stack, self._server = stack, server
        return self._server

    def take(self) -> tuple[contextlib.ExitStack, ModelServerProcess]:
        server = self.get()
        stack, self._stack, self._server = self._stack, None, None
        assert stack is not None
        return stack, server

    def close(self) -> None:
        stack, self._stack, self._server = self._stack, None, None
        if stack is not None:
            stack.close()

