"""Local scale to zero with the real model server (tiny synthetic model) behind the real proxy:
the first request spawns the server, requests arriving during the cold start are held and all
succeed, phases are recorded in order (metrics, JSON, span), the idle stop happens, the next
request cold-starts a new process, and the proxy's exit takes the backend down."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import signal
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from text_generation import Client as TGIClient

from edge_proxy.coldstart.phases import MILESTONES
from edge_proxy.config import Settings
from tests.coldstart_proxy import ProxyThread, pid_alive
from tests.net_support import free_port as _free_port, wait_until

pytestmark = pytest.mark.timeout(150)

IDLE_SECONDS = 3.0


def _chat(client: openai.OpenAI, i: int) -> tuple[str, dict[str, str]]:
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": f"hello {i}"}], max_tokens=3)
    out = raw.parse()
    return out.choices[0].message.content or "", dict(raw.headers)


def _stream(client: openai.OpenAI, i: int) -> tuple[str, dict[str, str]]:
    with client.completions.with_streaming_response.create(
            model="tiny", prompt=f"count {i}", max_tokens=3, stream=True) as resp:
        headers = dict(resp.headers)
        text = "".join(chunk.choices[0].text for chunk in resp.parse() if chunk.choices)
    return text, headers


def test_spawn_hold_idle_stop_and_restart(tiny_model_dir: Path) -> None:
    st = Settings()
    st.proxy.backend_url = f"http://127.0.0.1:{_free_port()}"
    st.coldstart.spawn = (f"{sys.executable} -m model_server serve {tiny_model_dir} "
                          f"--port {{port}} --device cpu --log-level warning")
    st.coldstart.idle_timeout_seconds = IDLE_SECONDS
    st.coldstart.max_wait_seconds = 90
    st.coldstart.stop_grace_seconds = 10
    spans = InMemorySpanExporter()
    with ProxyThread(st, span_exporter=spans) as p:
        assert p.snapshot()["process"]["running"] is False          # nothing until a request comes
        client = openai.OpenAI(base_url=p.url + "/v1", api_key="unused", max_retries=0, timeout=90)
        tgi = TGIClient(p.url, timeout=90)

        # 1. The first request spawns the backend; 19 more arrive while it is starting.
        with cf.ThreadPoolExecutor(20) as ex:
            first = ex.submit(_chat, client, 0)
            assert wait_until(lambda: p.snapshot()["process"]["pid"] is not None, 30)
            assert p.snapshot()["ready"] is False
            pid1 = p.snapshot()["process"]["pid"]
            more: list[cf.Future[Any]] = []
            for i in range(1, 20):
                kind = i % 3
                if kind == 0:
                    more.append(ex.submit(_chat, client, i))
                elif kind == 1:
                    more.append(ex.submit(_stream, client, i))
                else:
                    more.append(ex.submit(lambda i=i: tgi.generate(f"hi {i}", max_new_tokens=3)))
            results = [first.result()] + [f.result() for f in more]
        held_headers = [r[1] for r in results if isinstance(r, tuple)]
        for text, headers in (r for r in results if isinstance(r, tuple)):
            assert isinstance(text, str)
            assert headers.get("x-edge-cold-start") == "true"
            assert float(headers["x-edge-cold-start-wait-seconds"]) > 0
        for r in results:
            if not isinstance(r, tuple):
                assert r.details.generated_tokens >= 1
        assert len(held_headers) + sum(not isinstance(r, tuple) for r in results) == 20

        p.drain()
        assert p.metric("edge_proxy_cold_starts_total", outcome="ready") == 1
        assert p.metric("edge_proxy_held_requests_total") == 20
        assert p.metric("edge_proxy_pending_requests") == 0
        assert p.metric("edge_proxy_cold_start_rejected_requests_total", reason="hold_timeout") == 0

        # 2. Phases: all present, in order, in the JSON, the histogram and one span.
        assert wait_until(lambda: len(p.snapshot()["cold_starts"]) == 1, 10)
        cs = p.snapshot()["cold_starts"][0]
        ms = cs["milestones_seconds"]
        assert all(ms[m] is not None for m in MILESTONES), ms
        values = [ms[m] for m in MILESTONES]
        assert values == sorted(values), ms
        assert cs["milestone_sources"]["load_start"] == "backend"
        assert cs["outcome"] == "ready" and cs["released_requests"] == 20
        for phase in ("spawn", "listen", "load", "warmup", "first_token", "total"):
            assert p.metric("edge_proxy_cold_start_duration_seconds_count", phase=phase) == 1
        total = p.metric("edge_proxy_cold_start_duration_seconds_sum", phase="total")
        assert total == pytest.approx(ms["first_token"])
        cold_spans = [s for s in spans.get_finished_spans() if s.name == "cold_start"]
        assert len(cold_spans) == 1
        ev = [e.name for e in cold_spans[0].events]
        assert ev == [f"cold_start.{m}" for m in MILESTONES]
        stamps = [e.timestamp for e in cold_spans[0].events]
        assert stamps == sorted(stamps)

        # 3. Warm: no hold, no header.
        _, headers = _chat(client, 99)
        assert "x-edge-cold-start" not in headers

        # 4. Idle stop, then the next request cold-starts a new process.
        assert wait_until(lambda: not p.snapshot()["process"]["running"], IDLE_SECONDS * 6)
        assert wait_until(lambda: not pid_alive(pid1), 10)
        # counted once the supervisor's stop returns, a moment after the process is reaped (running false)
        assert wait_until(lambda: p.metric("edge_proxy_backend_process_exits_total", outcome="idle_stop") >= 1, 10)
        assert p.metric("edge_proxy_backend_process_exits_total", outcome="idle_stop") == 1
        text, headers = _stream(client, 100)
        assert headers.get("x-edge-cold-start") == "true"
        pid2 = p.snapshot()["process"]["pid"]
        assert pid2 is not None and pid2 != pid1
        assert p.metric("edge_proxy_cold_starts_total", outcome="ready") == 2
        assert wait_until(lambda: len(p.snapshot()["cold_starts"]) == 2, 10)

        # 5. A request that arrives while an idle stop is still draining the backend waits for
        #    the stop, then cold-starts a new process.
        stopping = asyncio.run_coroutine_threadsafe(p.gate.scale_to_zero(), p.loop)
        text, headers = _chat(client, 101)
        assert stopping.result(30) is True
        assert headers.get("x-edge-cold-start") == "true"
        pid3 = p.snapshot()["process"]["pid"]
        assert pid3 not in (None, pid2)
        assert p.metric("edge_proxy_cold_starts_total", outcome="error") == 0

        # 6. A crash while in use: the supervisor restarts the backend (after its backoff).
        os.kill(pid3, signal.SIGKILL)
        assert wait_until(lambda: p.snapshot()["process"]["pid"] not in (None, pid3), 30)
        pid4 = p.snapshot()["process"]["pid"]
        assert p.metric("edge_proxy_backend_process_exits_total", outcome="crash") == 1
        text, headers = _chat(client, 102)       # held if the restart is still loading, else warm
        assert isinstance(text, str)
        assert wait_until(lambda: len(p.snapshot()["cold_starts"]) == 4, 30)
        assert p.snapshot()["cold_starts"][3]["reason"] == "restart"
        assert p.snapshot()["cold_starts"][3]["outcome"] == "ready"
    # 7. Proxy shutdown stops the backend.
    for pid in (pid1, pid2, pid3, pid4):
        assert wait_until(lambda: not pid_alive(pid), 15), "backend outlived the proxy"
