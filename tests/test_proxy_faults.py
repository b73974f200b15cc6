"""Faults with backends that really fail: a killed process, a socket closed mid-stream, a backend
too slow, a client that goes away, bad input. The in-flight gauge returns to 0 every time."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import openai
import pytest
from text_generation import AsyncClient
from text_generation.errors import UnknownError

from edge_proxy.proxy.hooks import GateRejected
from tests.net_support import free_port
from tests.proxy_support import InProcessUpstream, metric_value, wait_until
from tests.running_proxy_support import running_proxy

pytestmark = pytest.mark.asyncio
ROOT = Path(__file__).resolve().parents[1]
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "a b"}], "max_tokens": 4}


class UpstreamProcess:
    """The fake upstream in its own process, so it can be killed for real."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.proxy_support", "--port", str(self.port)],
                                     cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def wait_ready(self) -> None:
        async with aiohttp.ClientSession() as s:
            for _ in range(200):
                try:
                    async with s.get(self.url + "/health") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError("fake upstream did not start")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


async def post(url: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s:
        kw = {"json": body} if isinstance(body, dict) else {"data": body}
        async with s.post(url, headers=headers or {}, **kw) as r:
            return r.status, await r.read()


async def check_settled(px, outcome: str, error_type: str | None) -> None:
    """The last request reached its final record with this outcome, and nothing is in flight."""
    await px.drain()
    assert metric_value(px.metrics_text(), "edge_proxy_in_flight_requests") == 0
    final = px.components["recorder"].final
    assert final, "no request reached on_request_final"
    rec = final[-1]
    assert rec.outcome == outcome and rec.error_type == error_type
    assert rec.t_end_ns is not None and rec.t_end_ns >= rec.t_received_ns


async def test_backend_killed_gives_502_in_client_format():
    up = UpstreamProcess()
    try:
        await up.wait_ready()
    finally:
        up.kill()
    async with running_proxy(up.url) as px:
        status, body = await post(px.url + "/v1/chat/completions", CHAT)
        assert status == 502
        err = json.loads(body)["error"]
        assert err["type"] == "upstream_error" and err["code"] == "connect"
        await check_settled(px, "error", "connect")
        status, body = await post(px.url + "/generate", {"inputs": "a", "parameters": {}})
        assert status == 502 and json.loads(body)["error_type"] == "upstream"
        client = openai.AsyncOpenAI(base_url=px.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as ei:
            await client.chat.completions.create(**CHAT)
        assert ei.value.status_code == 502
        await client.close()
        await check_settled(px, "error", "connect")
        assert metric_value(px.metrics_text(), "edge_proxy_upstream_errors_total", type="connect") == 3


@pytest.mark.parametrize("relay", ["raw", "aiohttp"])
async def test_slow_backend_gives_504(relay):
    async with InProcessUpstream() as up, running_proxy(up.url, upstream_timeout_seconds=0.3,
                                                         stream_relay=relay) as px:
        status, body = await post(px.url + "/v1/completions", {"model": "m", "prompt": "x"},
                                  headers={"x-fake-fault": "slow"})
        assert status == 504 and json.loads(body)["error"]["type"] == "timeout"
        await check_settled(px, "timeout", "timeout")
        status, body = await post(px.url + "/generate_stream", {"inputs": "x"}, headers={"x-fake-fault": "slow"})
        assert status == 504 and "error_type" in json.loads(body)
        await check_settled(px, "timeout", "timeout")


@pytest.mark.parametrize("relay", ["raw", "aiohttp"])
async def test_socket_closed_mid_stream_ends_with_error_event(relay):
    async with InProcessUpstream() as up, running_proxy(up.url, stream_relay=relay) as px:
        client = openai.AsyncOpenAI(base_url=px.url + "/v1", api_key="x", max_retries=0,
                                    default_headers={"x-fake-fault": "drop"})
        got = []
        with pytest.raises(openai.APIError):
            async for chunk in await client.chat.completions.create(**CHAT, stream=True):
                got.append(chunk)
        assert len(got) == 3           # role chunk + 2 tokens arrived before the socket closed
        await client.close()
        await check_settled(px, "error", "stream_broken")
        rec = px.components["recorder"].final[-1]
        assert len(rec.token_times_ns) == 2
        tgi = AsyncClient(px.url, headers={"x-fake-fault": "drop"})
        with pytest.raises(UnknownError):
            async for _ in tgi.generate_stream("a b", max_new_tokens=6):
                pass
        await check_settled(px, "error", "stream_broken")
        assert metric_value(px.metrics_text(), "edge_proxy_upstream_errors_total", type="stream_broken") == 2


async def test_backend_process_killed_mid_stream():
    up = UpstreamProcess()
    try:
        await up.wait_ready()
        async with running_proxy(up.url) as px:
            events = []
            async with aiohttp.ClientSession() as s:
                async with s.post(px.url + "/generate_stream", json={"inputs": "k"},
                                  headers={"x-fake-fault": "slow-tokens"}) as r:
                    assert r.status == 200
                    async for line in r.content:
                        if line.startswith(b"data:"):
                            events.append(json.loads(line[5:]))
                            if len(events) == 3:
                                up.kill()
            assert len(events) >= 4 and "token" in events[0]
            assert events[-1]["error_type"] == "upstream"      # the stream ends with an error event
            await check_settled(px, "error", "stream_broken")
    finally:
        up.kill()


@pytest.mark.parametrize("relay", ["raw", "aiohttp"])
async def test_client_disconnect_cancels_backend_request(relay):
    async with InProcessUpstream() as up, running_proxy(up.url, stream_relay=relay) as px:
        async with aiohttp.ClientSession() as s:
            r = await s.post(px.url + "/v1/chat/completions", json=dict(CHAT, stream=True),
                             headers={"x-fake-fault": "slow-tokens"})
            n = 0
            async for line in r.content:
                if line.startswith(b"data:"):
                    n += 1
                    if n == 3:
                        break
            r.close()            # the client goes away mid-stream
        # The backend sees its connection closed (200 tokens at 50 ms would take 10 s).
        assert await wait_until(lambda: up.state.disconnects == 1, timeout=5)
        assert up.state.finished_streams == 0
        await check_settled(px, "cancelled", "client_disconnect")
        assert metric_value(px.metrics_text(), "edge_proxy_requests_total", outcome="cancelled") == 1


async def check_rejected(px, log: Path, n: int, status: int, error_type: str) -> None:
    """Requests rejected before forwarding reach only the outputs (metrics, access log), never the
    observers: the access log holds ``n`` final records with this status and error type."""
    await px.drain()
    assert metric_value(px.metrics_text(), "edge_proxy_in_flight_requests") == 0
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == n
    assert all(r["status"] == status and r["outcome"] == "error" and r["error_type"] == error_type
               for r in lines), lines
    assert metric_value(px.metrics_text(), "edge_proxy_requests_total", status=str(status),
                        outcome="error") == n
    assert px.components["recorder"].calls == {}     # observers never saw a start


async def test_body_over_limit_413_backend_untouched(tmp_path):
    log = tmp_path / "access.jsonl"
    async with InProcessUpstream() as up, running_proxy(up.url, max_body_bytes=2048, access_log=str(log)) as px:
        big = dict(CHAT, messages=[{"role": "user", "content": "x" * 4096}])
        status, body = await post(px.url + "/v1/chat/completions", big)
        assert status == 413 and json.loads(body)["error"]["type"] == "invalid_request_error"
        status, body = await post(px.url + "/generate", {"inputs": "y" * 4096})
        assert status == 413 and json.loads(body)["error_type"] == "validation"
        assert up.state.requests == []
        await check_rejected(px, log, 2, 413, "too_large")


async def test_malformed_json_400_backend_untouched(tmp_path):
    log = tmp_path / "access.jsonl"
    async with InProcessUpstream() as up, running_proxy(up.url, access_log=str(log)) as px:
        status, body = await post(px.url + "/v1/chat/completions", b'{"model": "m", "messages": [')
        assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"
        await check_rejected(px, log, 1, 400, "bad_request")
        status, body = await post(px.url + "/generate_stream", b"[1, 2]")
        assert status == 400 and json.loads(body)["error_type"] == "validation"
        assert up.state.requests == []
        await check_rejected(px, log, 2, 400, "bad_request")


class _Gate:
    def __init__(self, reject: bool) -> None:
        self.reject, self.acquired, self.failures = reject, 0, 0

    async def acquire(self, rec) -> None:
        self.acquired += 1
        if self.reject:
            raise GateRejected("hold_full", "too many requests waiting for the backend")

    def notify_backend_failure(self) -> None:
        self.failures += 1

    def notify_activity(self) -> None:
        pass


async def test_gate_rejection_503_and_failure_notice():
    gate = _Gate(reject=True)
    async with InProcessUpstream() as up, running_proxy(up.url, gate=gate) as px:
        status, body = await post(px.url + "/v1/completions", {"model": "m", "prompt": "x"})
        assert status == 503 and json.loads(body)["error"]["code"] == "hold_full"
        assert gate.acquired == 1 and up.state.requests == []
        await check_settled(px, "rejected", "hold_full")
    gate = _Gate(reject=False)
    async with running_proxy(f"http://127.0.0.1:{free_port()}", gate=gate) as px:
        status, _ = await post(px.url + "/generate", {"inputs": "x"})
        # Hold mode: a refused connection is reported to the gate, the request is held once more
        # (gate.acquire again) and retried once; the retry fails too -> 502.
        assert status == 502 and gate.acquired == 2 and gate.failures >= 1
        await check_settled(px, "error", "connect")


async def test_backend_error_status_passed_through_as_is():
    async with InProcessUpstream() as up, running_proxy(up.url) as px:
        direct = await post(up.url + "/v1/chat/completions", dict(CHAT, stream=True), {"x-fake-fault": "500"})
        proxied = await post(px.url + "/v1/chat/completions", dict(CHAT, stream=True), {"x-fake-fault": "500"})
        assert proxied == direct and direct[0] == 500
        await check_settled(px, "error", "upstream_status")
        assert metric_value(px.metrics_text(), "edge_proxy_upstream_errors_total", type="upstream_status") == 1


@pytest.mark.parametrize("relay", ["raw", "aiohttp"])
async def test_stream_stalls_after_headers_ends_with_timeout_event(relay):
    async with InProcessUpstream() as up, running_proxy(up.url, upstream_timeout_seconds=0.3,
                                                         stream_relay=relay) as px:
        up.state.release = asyncio.Event()      # never set: headers, then silence
        status, body = await post(px.url + "/generate_stream", {"inputs": "q"}, {"x-fake-fault": "hold-first"})
        assert status == 200
        last = json.loads(body.strip().split(b"\n\n")[-1][len(b"data:"):])
        assert last["error_type"] == "upstream"
        await check_settled(px, "timeout", "timeout")
        up.state.release.set()
