"""Startup (listen before load), NF4 on CPU, client disconnect cancels, SIGTERM drains."""
from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import aiohttp
import pytest
import requests

from tests.api_workers_support import _metric
from tests.conftest import start_model_server

pytestmark = pytest.mark.timeout(180)


def _cancelled(url: str) -> float:
    text = requests.get(url + "/metrics", timeout=10).text
    return _metric(text, "model_server_requests_total", '{api="tgi",status="cancelled"}')


def test_client_disconnect_cancels_generation(model_server):
    before = _cancelled(model_server.url)

    async def read_two_then_drop():
        async with aiohttp.ClientSession() as s:
            resp = await s.post(model_server.url + "/generate_stream", json={
                "inputs": "x", "parameters": {"max_new_tokens": 480, "ignore_eos": True}})
            assert resp.status == 200
            seen = 0
            async for line in resp.content:
                if line.startswith(b"data:"):
                    seen += 1
                    if seen == 2:
                        break
            resp.close()           # drop the connection mid-stream
            return seen

    assert asyncio.run(read_two_then_drop()) == 2
    deadline = time.monotonic() + 30
    while _cancelled(model_server.url) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _cancelled(model_server.url) >= before + 1
    text = requests.get(model_server.url + "/metrics", timeout=10).text
    assert _metric(text, "model_server_in_flight_requests") == 0
    assert _metric(text, "model_server_engine_running_requests") == 0
    # a non-streaming request whose client gives up is cancelled too
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(model_server.url + "/generate", timeout=(5, 0.3), json={
            "inputs": "x", "parameters": {"max_new_tokens": 480, "ignore_eos": True}})
    deadline = time.monotonic() + 30
    while _cancelled(model_server.url) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _cancelled(model_server.url) >= before + 2
    # the server still works
    r = requests.post(model_server.url + "/generate", json={"inputs": "y", "parameters": {"max_new_tokens": 2}},
                      timeout=30)
    assert r.status_code == 200


def test_nf4_server_listens_first_then_serves_and_drains_on_sigterm(tiny_model_dir, model_server):
    fp32_info = requests.get(model_server.url + "/info", timeout=10).json()
    with start_model_server(tiny_model_dir, "--quantization", "nf4", wait_ready=False) as srv:
        # 1. it listens before the model is loaded: /health answers 503 with a loading state first
        states = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert srv.proc.poll() is None, srv.log()[-2000:]
            try:
                r = requests.get(srv.url + "/health", timeout=2)
            except requests.ConnectionError:
                time.sleep(0.05)
                continue
            states.append((r.status_code, r.json()["state"]))
            if r.status_code == 200:
                break
            info = requests.get(srv.url + "/info", timeout=2).json()
            # /info is read after /health: the server may have turned ready in between, but the two
            # fields must always agree with each other
            assert (info["ready"], info["state"]) in (
                (False, "starting"), (False, "loading"), (False, "warming"), (True, "ready")), info
            time.sleep(0.05)
        assert states[-1] == (200, "ready")
        assert any(code == 503 and st in ("loading", "warming") for code, st in states), states

        # 2. NF4 weights as loaded are smaller than the fp32 ones, and it generates on both APIs
        info = requests.get(srv.url + "/info", timeout=10).json()
        assert info["quantization"] == "nf4" and info["dtype"] == "bfloat16"
        assert 0 < info["weight_bytes"] < fp32_info["weight_bytes"] / 2
        assert info["parameters"] == fp32_info["parameters"]
        r = requests.post(srv.url + "/v1/completions", json={"prompt": "import os", "max_tokens": 4,
                                                             "ignore_eos": True}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4

        # 3. SIGTERM while a stream is in flight: the stream completes, new work is refused, exit 0
        n_new = 200
        result: dict = {}

        def stream():
            with requests.post(srv.url + "/generate_stream", stream=True, timeout=120, json={
                    "inputs": "def f():", "parameters": {"max_new_tokens": n_new, "ignore_eos": True}}) as resp:
                events = []
                for line in resp.iter_lines():
                    if line.startswith(b"data:"):
                        events.append(json.loads(line[5:]))
                        if len(events) == 1:
                            result["first"] = True
                result["events"] = events

        t = threading.Thread(target=stream)
        t.start()
        deadline = time.monotonic() + 60
        while "first" not in result and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "first" in result
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        health = requests.get(srv.url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["state"] == "draining"
        refused = requests.post(srv.url + "/generate", json={"inputs": "z"}, timeout=5)
        assert refused.status_code == 503 and refused.json()["error_type"] == "overloaded"
        t.join(timeout=120)
        events = result["events"]
        assert len(events) == n_new and events[-1]["details"]["generated_tokens"] == n_new
        assert srv.proc.wait(timeout=60) == 0
