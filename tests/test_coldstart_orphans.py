"""``--spawn`` against a taken port, and a SIGKILLed proxy with a ``sh -c`` backend (issue 19).

Before: a backend left on the port answered the readiness probe for a child that could not bind:
a restart every second, the backoff reset each time, cold starts recorded as "ready". And a
SIGKILLed proxy left a ``sh -c`` wrapper's child running (PR_SET_PDEATHSIG reached only the shell).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests

from edge_proxy.config import Settings
from tests.coldstart_proxy import ProxyThread, pid_alive
from tests.net_support import free_port, wait_http_ok, wait_until

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)
FAKE = f"{sys.executable} -m tests.proxy_support --port {{port}}"


def _ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def test_taken_port_is_a_clear_failure_with_growing_backoff() -> None:
    port = free_port()
    orphan = subprocess.Popen([sys.executable, "-m", "tests.proxy_support", "--port", str(port)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", timeout=30)
        st = Settings()
        st.proxy.backend_url = f"http://127.0.0.1:{port}"
        st.coldstart.spawn = FAKE
        st.coldstart.restart_backoff_seconds = 0.1
        st.coldstart.stop_grace_seconds = 2.0
        with ProxyThread(st) as p:
            for i in range(3):
                r = requests.post(p.url + "/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2},
                                  timeout=30)
                assert r.status_code == 503, r.text
                err = r.json()["error"]
                assert err["code"] == "spawn_failed" and f"port {port}" in err["message"], err
            snap = p.snapshot()
            assert snap["process"]["starts"] == 0            # nothing was started on a taken port
            assert snap["process"]["consecutive_failures"] == 3
            assert p.gate.supervisor.backoff_remaining_seconds() > 0.2    # 0.1, 0.2, 0.4 s: it grows
            assert [c["outcome"] for c in snap["cold_starts"]] == ["error"] * 3
            assert p.metric("edge_proxy_cold_starts_total", outcome="ready") == 0
    finally:
        orphan.kill()
        orphan.wait()


def test_sigkilled_proxy_takes_a_sh_c_backend_down() -> None:
    port, pport = free_port(), free_port()
    pidfile = Path(tempfile.mkdtemp()) / "backend.pid"
    # the shell stays the direct child (the server is not exec'd): the case PDEATHSIG cannot cover
    spawn = f"sh -c '{FAKE} & echo $! > {pidfile}; wait'"
    proxy = subprocess.Popen(
        [sys.executable, "-m", "edge_proxy", "serve", "--backend", f"http://127.0.0.1:{port}",
         "--backend-kind", "openai", "--port", str(pport), "--metrics-port", "none", "--energy-source", "none",
         "--access-log", "none", "--spawn", spawn, "--set", "coldstart.stop_grace_seconds=2"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    backend = None
    try:
        wait_http_ok(f"http://127.0.0.1:{pport}/healthz", timeout=30)
        r = requests.post(f"http://127.0.0.1:{pport}/v1/completions",
                          json={"model": "fake-model", "prompt": "hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200, r.text
        assert wait_until(pidfile.exists, 10)
        backend = int(pidfile.read_text())
        assert pid_alive(backend) and os.getpgid(backend) != os.getpgid(proxy.pid)
        os.kill(proxy.pid, signal.SIGKILL)
        proxy.wait(10)
        assert wait_until(lambda: not pid_alive(backend), 15), "the sh -c backend outlived the proxy"
        assert not _ok(f"http://127.0.0.1:{port}/health")
    finally:
        if proxy.poll() is None:
            proxy.kill()
        if backend is not None and pid_alive(backend):
            os.kill(backend, signal.SIGKILL)
