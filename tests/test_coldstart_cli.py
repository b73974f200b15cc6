"""``edge-proxy serve --spawn``: the backend process never outlives the proxy, whether the proxy
is stopped with SIGTERM / SIGINT (graceful stop of the process group) or killed with SIGKILL
(the child's parent-death signal)."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import urllib.request

import pytest

from tests.coldstart_proxy import pid_alive
from tests.net_support import free_port, wait_until

pytestmark = pytest.mark.timeout(60)


def _start_proxy(extra: list[str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_proxy", "serve", "--port", "0", "--metrics-port", "none",
         "--access-log", "none", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for _ in range(200):
        line = proc.stderr.readline()
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()   # keep the pipe drained
            return proc, m.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("proxy did not start")


def _snapshot(url: str) -> dict:
    with urllib.request.urlopen(url + "/edge/cold-starts", timeout=5) as r:
        return json.loads(r.read())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_backend_never_outlives_the_proxy(sig: signal.Signals) -> None:
    # A backend that listens but is never ready keeps the request held while we signal the proxy.
    backend = f"http://127.0.0.1:{free_port()}"
    spawn = f"{sys.executable} -m http.server {{port}} --bind 127.0.0.1"
    proc, url = _start_proxy(["--backend", backend, "--spawn", spawn, "--max-wait", "30",
                              "--set", "coldstart.stop_grace_seconds=5"])
    try:
        def held_request() -> None:
            req = urllib.request.Request(url + "/v1/completions", method="POST",
                                         data=b'{"model": "m", "prompt": "hi", "max_tokens": 2}',
                                         headers={"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(req, timeout=30).read()
            except Exception:  # noqa: BLE001 - the proxy goes away under it
                pass

        threading.Thread(target=held_request, daemon=True).start()
        pids: list[int] = []

        def spawned() -> bool:
            pid = _snapshot(url)["process"]["pid"]
            if pid:
                pids.append(pid)
            return bool(pids)

        assert wait_until(spawned, 20)
        assert _snapshot(url)["pending_requests"] == 1
        proc.send_signal(sig)
        proc.wait(timeout=20)
        if sig != signal.SIGKILL:
            assert proc.returncode == 0
        assert wait_until(lambda: not pid_alive(pids[0]), 15), "backend outlived the proxy"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
