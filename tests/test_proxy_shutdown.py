"""SIGTERM: /metrics answers through the drain; what outlives ``--drain-timeout`` ends in the API's
format (issue 19). Before: the metrics port closed at once and aiohttp cut streams after ~120 s
without an error event.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import pytest
import requests

from tests.net_support import free_port, wait_http_ok
from tests.proxy_support import metric_value

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)
DRAIN_S = 2.0


async def _clients(url: str, started: asyncio.Event) -> list[tuple[str, int, str]]:
    streams = [("openai", "/v1/chat/completions", {"model": "fake-model", "stream": True, "max_tokens": 4,
                                                    "messages": [{"role": "user", "content": "a b"}]}),
               ("tgi", "/generate_stream", {"inputs": "a b", "parameters": {"max_new_tokens": 4}})]

    async def stream(s: aiohttp.ClientSession, api: str, path: str, body: dict) -> tuple[str, int, str]:
        lines: list[str] = []
        try:
            async with s.post(url + path, json=body, headers={"x-fake-fault": "slow-tokens"}) as r:
                async for line in r.content:
                    if line.startswith(b"data:"):
                        lines.append(line.decode().strip())
                        if len(lines) == 2:
                            started.set()
                return api, r.status, lines[-1] if lines else ""
        except aiohttp.ClientError as exc:          # the stream was cut without an event
            return api, 0, f"{type(exc).__name__} after {lines[-1:]}"

    async def whole(s: aiohttp.ClientSession) -> tuple[str, int, str]:
        try:
            async with s.post(url + "/v1/completions", json={"model": "fake-model", "prompt": "a",
                                                             "max_tokens": 2}, headers={"x-fake-fault": "slow"}) as r:
                return "whole", r.status, await r.text()
        except aiohttp.ClientError as exc:
            return "whole", 0, type(exc).__name__

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        return await asyncio.gather(*[stream(s, *a) for a in streams], stream(s, *streams[0]), whole(s))


def test_sigterm_keeps_metrics_up_and_cuts_streams_with_an_error_event():
    up_port, port, mport = free_port(), free_port(), free_port()
    log = tempfile.NamedTemporaryFile(prefix="edge_proxy_", suffix=".log", delete=False)
    up = subprocess.Popen([sys.executable, "-m", "tests.proxy_support", "--port", str(up_port)], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proxy = subprocess.Popen(
        [sys.executable, "-m", "edge_proxy", "serve", "--backend", f"http://127.0.0.1:{up_port}",
         "--port", str(port), "--metrics-port", str(mport), "--energy-source", "none", "--access-log", "none",
         "--drain-timeout", str(DRAIN_S)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    metrics_url = f"http://127.0.0.1:{mport}/metrics"
    try:
        wait_http_ok(f"http://127.0.0.1:{up_port}/health", proc=up)
        wait_http_ok(metrics_url, proc=proxy)
        scrapes: list[tuple[float, int]] = []          # (seconds after SIGTERM, in-flight gauge)
        out: dict[str, object] = {}

        def run_clients() -> None:
            async def main() -> None:
                started = asyncio.Event()
                task = asyncio.ensure_future(_clients(f"http://127.0.0.1:{port}", started))
                await asyncio.wait_for(started.wait(), 30)
                await asyncio.sleep(0.3)
                out["t_term"] = time.monotonic()
                proxy.send_signal(signal.SIGTERM)
                out["results"] = await task
            asyncio.run(main())

        th = threading.Thread(target=run_clients)
        th.start()
        while proxy.poll() is None:
            t_term = out.get("t_term")
            if t_term is not None:
                try:
                    text = requests.get(metrics_url, timeout=1).text
                    scrapes.append((time.monotonic() - float(t_term),
                                    int(metric_value(text, "edge_proxy_in_flight_requests"))))
                except requests.RequestException:
                    pass
            time.sleep(0.1)
        th.join(30)
        assert proxy.returncode == 0
        results = out["results"]
    finally:
        for p in (proxy, up):
            if p.poll() is None:
                p.kill()
                p.wait()
        text = Path(log.name).read_text(errors="replace")
        os.unlink(log.name)
    # /metrics answered during the drain, with the requests still in flight
    assert any(t > 0.5 and n >= 4 for t, n in scrapes), scrapes
    assert max(t for t, _ in scrapes) >= DRAIN_S * 0.8, scrapes
    for api, status, last in results:
        if api == "whole":
            assert status == 503, last
            assert json.loads(last)["error"]["code"] == "shutdown"
            continue
        assert status == 200, last
        event = json.loads(last.split(":", 1)[1])
        if api == "openai":
            assert event["error"]["code"] == "shutdown" and "shutting down" in event["error"]["message"]
        else:
            assert event["error_type"] == "overloaded" and "shutting down" in event["error"]
    assert "drain bound of 2 s reached: cut 3 stream(s)" in text, text[-2000:]
