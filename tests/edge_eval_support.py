"""Helpers for edge-eval tests: an edge-proxy subprocess on free ports with the lookup token."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from prometheus_client.parser import text_string_to_metric_families

from tests.net_support import free_port, wait_http_ok

TOKEN = "lookup-s3cret"


@dataclass
class ProxyProc:
    proc: subprocess.Popen
    port: int
    metrics_port: int
    log_path: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(self.metrics_url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}


@contextlib.contextmanager
def edge_proxy(backend_url: str, model_name: str, *extra: str,
               env: dict[str, str] | None = None) -> Iterator[ProxyProc]:
    port, mport = free_port(), free_port()
    log = tempfile.NamedTemporaryFile(prefix="edge_proxy_", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "edge_proxy", "serve", "--backend", backend_url, "--port", str(port),
           "--metrics-port", str(mport), "--energy-source", "estimated", "--model-name", model_name,
           *extra]
    full_env = {**os.environ, "EDGE_PROXY_ENERGY_LOOKUP_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1",
                **(env or {})}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    p = ProxyProc(proc, port, mport, log.name)
    try:
        wait_http_ok(f"{p.metrics_url}/healthz", timeout=60, proc=proc)
        yield p
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        with contextlib.suppress(OSError):
            os.unlink(log.name)


def run_eval(proxy: ProxyProc, out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "edge_eval", "eval", "--endpoint", proxy.url, "--out", str(out),
           "--lookup-url", proxy.metrics_url, "--lookup-token", TOKEN, "--quiet", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
