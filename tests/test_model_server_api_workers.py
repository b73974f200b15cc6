"""``serve --api-workers N``: HTTP in N worker processes against one engine process (fast engine, CPU).

Real processes on 127.0.0.1, real clients (openai, text_generation, aiohttp): the same greedy text as the
one-process server through both APIs, several workers answering on one port with aggregated request
metrics, cancellation (client disconnect, stop sequence) reaching the engine, a worker dying cancels
its requests and is replaced (a restart budget), the engine process dying ends the workers' streams and the workers, bad arguments.
The metric, readiness and shared-server helpers are in tests/api_workers_support.py.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from typing import Iterator

import aiohttp
import psutil
import pytest
import requests
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families

from tests.api_workers_support import _engine_idle, _metric, _metrics, _WorkersServers
from tests.conftest import ModelServerProcess, start_model_server
from tests.net_support import PROMETHEUS_ACCEPT, wait_until

pytestmark = pytest.mark.timeout(240)
MAX_NEW = 480          # long enough that only a cancel ends it early (the tiny model's context is 512)


@pytest.fixture(scope="module")
def _workers_servers(tiny_model_dir):
    servers = _WorkersServers(tiny_model_dir)
    yield servers
    servers.close()


@pytest.fixture
def workers_server(_workers_servers) -> ModelServerProcess:
    """A running ``--api-workers 2`` server that the test leaves running (shared within the module)."""
    return _workers_servers.get()


@pytest.fixture
def workers_server_to_end(_workers_servers) -> Iterator[ModelServerProcess]:
    """A running ``--api-workers 2`` server that the test ends; stopped (if still running) afterwards."""
    stack, server = _workers_servers.take()
    with stack:
        yield server


def _generate_all(url: str) -> dict[str, object]:
    from openai import OpenAI
    from text_generation import Client

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    out: dict[str, object] = {}
    out["completion"] = client.completions.create(model="tiny", prompt="def main():", max_tokens=12).choices[0].text
    out["completion_stream"] = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="def main():", max_tokens=12, stream=True))
    msgs = [{"role": "user", "content": "Say something"}]
    out["chat"] = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10).choices[0].message.content
    out["chat_stream"] = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=10, stream=True) if c.choices)
    events = list(Client(url, timeout=60).generate_stream("class Foo:", max_new_tokens=8))
    out["tgi_stream"] = ([e.token.id for e in events], events[-1].generated_text, events[-1].details.finish_reason)
    return out


def test_workers_serve_the_same_text_as_one_process(tiny_model_dir, workers_server):
    got = _generate_all(workers_server.url)
    with start_model_server(tiny_model_dir, "--engine", "fast", "--max-batch", "8") as single:
        want = _generate_all(single.url)
    assert got == want
    assert got["completion"] == got["completion_stream"] and got["chat"] == got["chat_stream"]
    info = requests.get(workers_server.url + "/info", timeout=10).json()
    assert info["api_workers"] == 2 and info["engine"] == "fast" and info["ready"] is True
    assert info["startup"]["load_end"] >= info["startup"]["load_start"] > 0


def test_two_workers_share_the_port_and_metrics_add_up(workers_server):
    url = workers_server.url
    pids = {requests.get(url + "/info", timeout=10).json()["api_worker_pid"] for _ in range(24)}
    assert len(pids) == 2                               # fresh connections reach both workers
    before = _metric(_metrics(url), "model_server_requests_total", '{api="tgi",status="success"}')
    for _ in range(8):                                  # each on a new connection: spread over both
        r = requests.post(url + "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}, timeout=30)
        assert r.status_code == 200
    for _ in range(4):                                  # whichever worker answers the scrape
        assert _metric(_metrics(url), "model_server_requests_total", '{api="tgi",status="success"}') == before + 8
    assert _metric(_metrics(url), "model_server_engine_max_batch_size") == 8
    # Prometheus' own scrape gets OpenMetrics, summed over the workers as well
    om = requests.get(url + "/metrics", headers={"Accept": PROMETHEUS_ACCEPT}, timeout=10)
    assert om.headers["Content-Type"].startswith("application/openmetrics-text")
    fams = {f.name: f for f in om_families(om.text)}
    ok = [s.value for s in fams["model_server_requests"].samples
          if s.name == "model_server_requests_total" and s.labels == {"api": "tgi", "status": "success"}]
    assert ok == [before + 8]
    assert [s.value for s in fams["model_server_engine_max_batch_size"].samples] == [8]


async def _read_then_drop(url: str, path: str, body: dict, n: int) -> int:
    async with aiohttp.ClientSession() as s:
        resp = await s.post(url + path, json=body)
        assert resp.status == 200
        seen = 0
        async for line in resp.content:
            if line.startswith(b"data:"):
                seen += 1
                if seen == n:
                    break
        resp.close()
        return seen


def test_disconnect_and_stop_sequence_cancel_in_the_engine(workers_server):
    url = workers_server.url
    decoded = _metric(_metrics(url), "model_server_engine_decode_tokens_total")
    body = {"model": "tiny", "prompt": "x", "max_tokens": MAX_NEW, "ignore_eos": True, "stream": True}
    assert asyncio.run(_read_then_drop(url, "/v1/completions", body, 2)) == 2
    assert wait_until(lambda: _engine_idle(url), 60)
    # the engine stopped decoding it: far fewer tokens than the request asked for
    assert _metric(_metrics(url), "model_server_engine_decode_tokens_total") - decoded < MAX_NEW - 1
    # a stop sequence ends the request in the engine too
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    full = client.completions.create(model="tiny", prompt="def main():", max_tokens=12).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    decoded = _metric(_metrics(url), "model_server_engine_decode_tokens_total")
    r = client.completions.create(model="tiny", prompt="def main():", max_tokens=MAX_NEW, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text
    assert wait_until(lambda: _engine_idle(url), 60)
    assert _metric(_metrics(url), "model_server_engine_decode_tokens_total") - decoded < MAX_NEW - 1


def test_a_worker_dying_cancels_its_requests_and_the_engine_dying_ends_the_workers(workers_server_to_end):
    srv = workers_server_to_end
    url = srv.url
    log_before = len(srv.log())             # the server may have served other tests: only this test's lines
    engine_proc = psutil.Process(srv.proc.pid)
    workers = engine_proc.children()
    assert len(workers) == 2
    decoded = _metric(_metrics(url), "model_server_engine_decode_tokens_total")

    async def stream_then_kill() -> str:
        # one keep-alive connection: /info names the worker that will also serve the stream
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
            async with s.get(url + "/info") as r:
                pid = (await r.json())["api_worker_pid"]
            resp = await s.post(url + "/generate_stream", json={
                "inputs": "x", "parameters": {"max_new_tokens": MAX_NEW, "ignore_eos": True}})
            await resp.content.readline()
            os.kill(pid, signal.SIGKILL)
            try:
                await resp.read()
            except aiohttp.ClientError:
                pass
            return pid

    killed = asyncio.run(stream_then_kill())
    assert wait_until(lambda: _engine_idle(url), 60)      # the survivor reports the engine's stats
    assert _metric(_metrics(url), "model_server_engine_decode_tokens_total") - decoded < MAX_NEW - 1
    r = requests.post(url + "/generate", json={"inputs": "y", "parameters": {"max_new_tokens": 2}}, timeout=30)
    assert r.status_code == 200
    assert "exited with status" in srv.log()[log_before:] and "restarting it" in srv.log()[log_before:]
    survivor = next(w for w in workers if w.pid != killed)
    # the dead worker is replaced: two workers again, the new one listening on the shared port
    assert wait_until(lambda: len([w for w in engine_proc.children() if w.is_running()
                                   and w.status() != psutil.STATUS_ZOMBIE]) == 2, 60)
    new_pid = next(w.pid for w in engine_proc.children() if w.pid not in (killed, survivor.pid))

    states: list[str] = []

    def served_by_new() -> bool:        # a fresh connection each time: the kernel picks a worker
        info = requests.get(url + "/info", timeout=10, headers={"Connection": "close"}).json()
        if info["api_worker_pid"] == new_pid:
            states.append(info["state"])
        return bool(states)
    assert wait_until(served_by_new, 60, interval=0.02)
    # it listens only once its tokenizer is loaded: its first answer is already "ready", never "loading"
    assert states == ["ready"]

    async def stream_then_kill_engine() -> bytes:
        async with aiohttp.ClientSession() as s:
            resp = await s.post(url + "/generate_stream", json={
                "inputs": "x", "parameters": {"max_new_tokens": MAX_NEW, "ignore_eos": True}})
            await resp.content.readline()
            engine_proc.send_signal(signal.SIGKILL)
            try:
                return await asyncio.wait_for(resp.read(), 60)      # ends: never hangs
            except aiohttp.ClientError:
                return b""

    rest = asyncio.run(stream_then_kill_engine())
    assert b"the engine process exited" in rest or rest == b""
    assert wait_until(lambda: not survivor.is_running() or survivor.status() == psutil.STATUS_ZOMBIE, 30)


def test_sigterm_drains_live_streams_through_the_workers(workers_server_to_end):
    srv = workers_server_to_end
    url = srv.url

    async def stream_through_sigterm() -> tuple[list[bytes], int]:
        async with aiohttp.ClientSession() as s:
            resp = await s.post(url + "/generate_stream", json={
                "inputs": "x", "parameters": {"max_new_tokens": 64, "ignore_eos": True}})
            lines = [await resp.content.readline()]
            srv.proc.send_signal(signal.SIGTERM)
            lines += [ln for ln in (await resp.read()).split(b"\n") if ln.startswith(b"data:")]
            refused = 0
            try:        # a new request during the drain is refused (503) or finds nobody listening
                async with s.post(url + "/generate", json={"inputs": "y"}) as r:
                    refused = r.status
            except aiohttp.ClientError:
                refused = -1
            return lines, refused

    lines, refused = asyncio.run(stream_through_sigterm())
    assert len(lines) == 64 and b'"finish_reason":"length"' in lines[-1]      # finished, not cut
    assert refused in (503, -1)
    assert srv.proc.wait(timeout=60) == 0


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_server", "serve", *args], capture_output=True, text=True,
                          timeout=120)


def test_bad_api_workers_arguments_fail_with_one_line(tiny_model_dir):
    r = _serve(tiny_model_dir, "--api-workers", "-1")
    assert r.returncode == 2 and "--api-workers: expected a non-negative integer" in r.stderr
    r = _serve(tiny_model_dir, "--engine", "transformers", "--api-workers", "2")
    assert r.returncode == 2 and "--api-workers needs the fast engine" in r.stderr
    # a port another server shares through SO_REUSEPORT is refused, not silently split
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        r = _serve(tiny_model_dir, "--engine", "fast", "--port", str(other.getsockname()[1]), "--api-workers", "2")
    assert r.returncode == 2 and "cannot listen on 127.0.0.1" in r.stderr
    r = subprocess.run([sys.executable, "-m", "model_server", "serve", tiny_model_dir, "--engine", "fast",
                        "--api-workers", "2"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "MODEL_SERVER_API_WORKER_RESTARTS": "many"})
    assert r.returncode == 2 and "MODEL_SERVER_API_WORKER_RESTARTS must be an integer >= 0" in r.stderr
    # auto on a CPU picks the transformers engine: refused once it is known, and the workers exit
    r = _serve(tiny_model_dir, "--device", "cpu", "--port", "0", "--api-workers", "1")
    assert r.returncode == 1 and "--api-workers needs the fast engine" in r.stderr


def test_restart_budget_leaves_a_worker_that_keeps_dying_dead():
    from model_server.api_workers import RestartBudget

    b = RestartBudget(2, window_s=60.0)
    assert b.take(0.0) and b.take(1.0)
    assert not b.take(2.0)                  # a third restart within the minute: left dead
    assert b.take(60.5)                     # the first one left the window
    assert not RestartBudget(0).take(0.0)   # MODEL_SERVER_API_WORKER_RESTARTS=0: never restart
