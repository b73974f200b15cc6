"""Test support for real processes on 127.0.0.1: free ports, waiting for an HTTP endpoint or a
condition, stopping a subprocess server. One definition of each, imported by the test files
(tests/conftest.py re-exports ``free_port`` and ``wait_http_ok`` for the fixtures).

Must NOT: hold fixtures (conftest.py does), know about the proxy or the model server (proxy_support.py,
running_proxy_support.py, coldstart_proxy.py, edge_eval_support.py, api_workers_support.py do), or listen
anywhere but 127.0.0.1.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any, Callable

# the Accept header of Prometheus 2.x's scrape request (OpenMetrics first, the classic text format as fallback)
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http_ok(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers 200; raise TimeoutError (or RuntimeError if ``proc`` died)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was ok")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
                last = resp.status
        except urllib.error.HTTPError as exc:
            last = exc.code
        except (urllib.error.URLError, ConnectionError, OSError) as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ok after {timeout:.0f} s (last: {last})")


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.05) -> bool:
    """Call ``pred`` every ``interval`` s until it is true or ``timeout`` s passed (monotonic clock);
    its last truth value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> int | None:
    """SIGTERM ``proc`` if it still runs, wait ``timeout`` s, then SIGKILL; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode
