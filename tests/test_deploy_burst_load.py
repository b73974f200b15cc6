"""k8s/burst_load.py, the load generator docs/kubernetes.md runs against a cluster's gateway, run
here against a real gateway whose backend is down at first (``--spawn`` stands in for KEDA): the
first burst waits for a cold start, the second does not, and bad arguments are one-line errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.net_support import free_port, wait_http_ok

ROOT = Path(__file__).resolve().parent.parent
EDGE_PROXY = shutil.which("edge-proxy", path=str(Path(sys.executable).parent)) or "edge-proxy"


def test_burst_load_against_a_gateway_that_cold_starts(tiny_model_dir: str) -> None:
    port, mport, backend = free_port(), free_port(), free_port()
    spawn = (f"{sys.executable} -m model_server serve {tiny_model_dir} --host 127.0.0.1 --port {{port}} "
             "--device cpu --model-name tiny")
    gw = subprocess.Popen([EDGE_PROXY, "serve", "--host", "127.0.0.1", "--port", str(port), "--metrics-port",
                           str(mport), "--backend", f"http://127.0.0.1:{backend}", "--spawn", spawn,
                           "--energy-source", "none"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http_ok(f"http://127.0.0.1:{mport}/healthz", timeout=30, proc=gw)
        out = subprocess.run([sys.executable, str(ROOT / "k8s" / "burst_load.py"), "--url", f"http://127.0.0.1:{port}",
                              "--model", "tiny", "--bursts", "2", "--size", "3", "--pause", "0", "--max-tokens", "2",
                              "--timeout", "180"], capture_output=True, text=True, timeout=240)
    finally:
        gw.terminate()
        gw.wait(timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    first, second, summary = lines
    assert first["ok"] == 3 and first["cold_start_requests"] == 3 and first["max_cold_wait_seconds"] > 0
    assert second["ok"] == 3 and second["cold_start_requests"] == 0
    assert summary["summary"] == {"bursts": 2, "requests": 6, "ok": 6, "bursts_with_cold_start": 1}


def test_burst_load_bad_arguments() -> None:
    for bad in (["--url", "localhost:8080", "--model", "m"], ["--url", "http://x", "--model", "m", "--size", "0"]):
        out = subprocess.run([sys.executable, str(ROOT / "k8s" / "burst_load.py"), *bad],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
