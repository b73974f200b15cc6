"""Gateway mode (``--hold`` without ``--spawn``), as in front of a Kubernetes backend scaled to
zero: requests are held while nothing listens, ``edge_proxy_pending_requests`` shows them (the
KEDA signal), and they succeed once a real model server comes up on the backend port; the process
start comes from the server's own /info timeline. When the backend goes away later, the request
that finds it down is held (not a 502) until it is back."""
from __future__ import annotations

import concurrent.futures as cf
import os
import subprocess
import sys

import openai
import pytest

from edge_proxy.config import Settings
from tests.coldstart_proxy import ProxyThread
from tests.net_support import free_port, stop_process as _stop, wait_until

pytestmark = pytest.mark.timeout(120)


def _start_server(model_dir: str, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "model_server", "serve", model_dir, "--port", str(port), "--device", "cpu",
         "--model-name", "tiny", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def _chat(client: openai.OpenAI, i: int) -> dict[str, str]:
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=2)
    raw.parse()
    return dict(raw.headers)


def test_hold_until_backend_scales_up(tiny_model_dir: str) -> None:
    port = free_port()
    st = Settings()
    st.proxy.backend_url = f"http://127.0.0.1:{port}"
    st.coldstart.hold = True
    st.coldstart.max_wait_seconds = 90
    servers: list[subprocess.Popen[bytes]] = []
    try:
        with ProxyThread(st) as p:
            client = openai.OpenAI(base_url=p.url + "/v1", api_key="unused", max_retries=0, timeout=90)
            with cf.ThreadPoolExecutor(4) as ex:
                futs = [ex.submit(_chat, client, i) for i in range(3)]
                assert wait_until(lambda: p.metric("edge_proxy_pending_requests") == 3, 20)
                servers.append(_start_server(tiny_model_dir, port))      # the "scale up"
                headers = [f.result() for f in futs]
            assert all(h.get("x-edge-cold-start") == "true" for h in headers)
            assert p.metric("edge_proxy_cold_starts_total", outcome="ready") == 1
            assert wait_until(lambda: len(p.snapshot()["cold_starts"]) == 1, 10)
            cs = p.snapshot()["cold_starts"][0]
            assert cs["milestone_sources"]["process_start"] == "backend"
            # started after the hold began, within the precision of the backend's process start
            # (/proc start time: one clock tick, 10 ms at 100 Hz; a CI run saw -7 ms)
            tick = 1.0 / os.sysconf("SC_CLK_TCK")
            assert cs["milestones_seconds"]["process_start"] >= -(tick + 0.002)
            assert cs["milestones_seconds"]["first_token"] >= cs["milestones_seconds"]["ready"]
            assert "x-edge-cold-start" not in _chat(client, 10)

            # The backend goes away: the next request is held, not a 502, until it is back.
            _stop(servers[0])
            with cf.ThreadPoolExecutor(1) as ex:
                fut = ex.submit(_chat, client, 20)
                assert wait_until(lambda: p.metric("edge_proxy_pending_requests") == 1, 20)
                servers.append(_start_server(tiny_model_dir, port))
                assert fut.result().get("x-edge-cold-start") == "true"
            assert p.metric("edge_proxy_cold_starts_total", outcome="ready") == 2
            assert p.gate.supervisor is None           # hold mode never starts or stops processes
    finally:
        for s in servers:
            _stop(s)
