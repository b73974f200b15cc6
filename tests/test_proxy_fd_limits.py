"""Out of file descriptors is the proxy's own 503, not a backend outage (issue 19).

The proxy runs as a real subprocess under a low ``RLIMIT_NOFILE`` (soft = hard, so it cannot raise
it) and really runs out while streams are open. Before: 502 "backend unreachable", counted as
upstream connect errors, nothing logged.
"""
from __future__ import annotations

import asyncio
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import pytest
import requests

from tests.net_support import free_port, wait_http_ok
from tests.proxy_support import metric_value

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(180)
STREAM = {"model": "fake-model", "messages": [{"role": "user", "content": "a b"}], "max_tokens": 4,
          "stream": True}


def _limit(soft: int, hard: int):
    def pre() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return pre


class Procs:
    def __init__(self, soft: int, hard: int) -> None:
        self.up_port, self.port, self.mport = free_port(), free_port(), free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="edge_proxy_", suffix=".log", delete=False)
        self.up = subprocess.Popen([sys.executable, "-m", "tests.proxy_support", "--port", str(self.up_port)],
                                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.proxy = subprocess.Popen(
            [sys.executable, "-m", "edge_proxy", "serve", "--backend", f"http://127.0.0.1:{self.up_port}",
             "--backend-kind", "openai", "--port", str(self.port), "--metrics-port", str(self.mport),
             "--energy-source", "none", "--access-log", "none"],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=_limit(soft, hard))
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.mport}/metrics"

    def stop(self) -> str:
        for p in (self.proxy, self.up):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        text = Path(self.log.name).read_text(errors="replace")
        os.unlink(self.log.name)
        return text


async def _streams(url: str, n: int) -> list[tuple[int, str]]:
    async def one(s: aiohttp.ClientSession) -> tuple[int, str]:
        try:
            async with s.post(url + "/v1/chat/completions", json=STREAM,
                              headers={"x-fake-fault": "slow-tokens"}) as r:
                return r.status, (await r.text())[:300]
        except aiohttp.ClientError as exc:        # a connection the proxy could not accept
            return 0, type(exc).__name__

    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=90)) as s:
        return await asyncio.gather(*[one(s) for _ in range(n)])


def test_fd_exhaustion_is_503_counted_and_logged():
    px = Procs(soft=96, hard=96)
    try:
        wait_http_ok(f"http://127.0.0.1:{px.up_port}/health", proc=px.up)
        wait_http_ok(px.metrics_url, proc=px.proxy)
        results = asyncio.run(_streams(px.url, 120))
        statuses = [s for s, _ in results]
        assert 503 in statuses, statuses
        assert 502 not in statuses, [r for r in results if r[0] == 502][:3]
        body = next(b for s, b in results if s == 503)
        assert '"code": "fd_exhausted"' in body and "file descriptors" in body
        time.sleep(1.5)                             # asyncio resumes accepting 1 s after EMFILE
        text = requests.get(px.metrics_url, timeout=10).text
        assert metric_value(text, "edge_proxy_process_errors_total", type="fd_exhausted") == statuses.count(503)
        assert metric_value(text, "edge_proxy_upstream_errors_total", type="connect") == 0
        # recovered once the streams ended
        r = requests.post(px.url + "/v1/chat/completions", json={**STREAM, "stream": False}, timeout=30)
        assert r.status_code == 200
    finally:
        log = px.stop()
    lines = [ln for ln in log.splitlines() if "out of file descriptors" in ln]
    assert lines and "RLIMIT_NOFILE soft 96" in lines[0], log[-2000:]
    assert len(lines) <= 3                          # rate-limited: one line per 10 s


def test_soft_limit_is_raised_to_the_hard_limit():
    px = Procs(soft=256, hard=4096)
    try:
        wait_http_ok(px.metrics_url, proc=px.proxy)
        limits = Path(f"/proc/{px.proxy.pid}/limits").read_text()
        m = re.search(r"^Max open files\s+(\d+)\s+(\d+)", limits, re.M)
        assert m and (int(m.group(1)), int(m.group(2))) == (4096, 4096), limits
    finally:
        log = px.stop()
    assert "raised the open-file limit from 256 to 4096" in log
