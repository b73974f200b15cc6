"""Cold-start failure paths with real processes: a spawn command that fails, a backend that never
becomes ready, a full hold queue, hold mode vs plain 502. Held requests must get a prompt, clear
503 in the client API's format, the counters must say so, and nothing may leak."""
from __future__ import annotations

import concurrent.futures as cf
import sys

import openai
import pytest
import requests

from edge_proxy.config import Settings
from tests.coldstart_proxy import ProxyThread, pid_alive
from tests.net_support import free_port as _free_port, wait_until

pytestmark = pytest.mark.timeout(90)


def _settings(spawn: str | None = None, hold: bool = False, max_wait: float = 30.0,
              max_pending: int = 100) -> Settings:
    st = Settings()
    st.proxy.backend_url = f"http://127.0.0.1:{_free_port()}"
    st.coldstart.spawn = spawn
    st.coldstart.hold = hold
    st.coldstart.max_wait_seconds = max_wait
    st.coldstart.max_pending = max_pending
    st.coldstart.stop_grace_seconds = 2.0
    st.coldstart.restart_backoff_seconds = 0.2
    return st


def _openai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _complete(client: openai.OpenAI) -> Exception | None:
    try:
        client.completions.create(model="m", prompt="hi", max_tokens=2)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc
    return None


def test_spawn_command_that_exits_gives_held_requests_503() -> None:
    cmd = f"{sys.executable} -c 'import sys, time; time.sleep(0.5); sys.exit(3)'"
    with ProxyThread(_settings(spawn=cmd)) as p:
        client = _openai(p.url)
        with cf.ThreadPoolExecutor(5) as ex:
            errors = list(ex.map(lambda _: _complete(client), range(5)))
        for err in errors:
            assert isinstance(err, openai.APIStatusError) and err.status_code == 503, err
            assert "exited with code 3" in err.message
            assert err.body["code"] == "spawn_failed"  # type: ignore[index]
        assert p.metric("edge_proxy_cold_starts_total", outcome="error") == 1
        assert p.metric("edge_proxy_cold_starts_total", outcome="ready") == 0
        assert p.metric("edge_proxy_cold_start_rejected_requests_total", reason="spawn_failed") == 5
        assert p.metric("edge_proxy_pending_requests") == 0
        snap = p.snapshot()
        assert snap["process"]["running"] is False and snap["process"]["last_returncode"] == 3
        assert snap["cold_starts"][-1]["outcome"] == "error"


def test_spawn_command_not_found_gives_503_in_tgi_format() -> None:
    with ProxyThread(_settings(spawn="/nonexistent/edge-eval-backend --port {port}")) as p:
        r = requests.post(p.url + "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}},
                          timeout=30)
        assert r.status_code == 503
        body = r.json()
        assert body["error_type"] == "upstream" and "could not be started" in body["error"]
        assert p.metric("edge_proxy_cold_starts_total", outcome="error") == 1
        assert p.metric("edge_proxy_backend_process_exits_total", outcome="start_failed") == 1


def test_backend_that_never_becomes_ready_times_out_and_is_killed() -> None:
    # A real HTTP server that listens but has no /health, /v1/models or /info: never ready.
    cmd = f"{sys.executable} -m http.server {{port}} --bind 127.0.0.1"
    with ProxyThread(_settings(spawn=cmd, max_wait=2.0)) as p:
        client = _openai(p.url)
        pids: list[int] = []

        def watch_pid() -> bool:
            pid = p.snapshot()["process"]["pid"]
            if pid:
                pids.append(pid)
            return bool(pids)

        with cf.ThreadPoolExecutor(4) as ex:
            futs = [ex.submit(_complete, client) for _ in range(3)]
            assert wait_until(watch_pid, 10)
            errors = [f.result() for f in futs]
        for err in errors:
            assert isinstance(err, openai.APIStatusError) and err.status_code == 503
            assert err.body["code"] == "hold_timeout"  # type: ignore[index]
            assert "did not become ready" in err.message
        assert p.metric("edge_proxy_cold_starts_total", outcome="timeout") == 1
        assert p.metric("edge_proxy_cold_start_rejected_requests_total", reason="hold_timeout") == 3
        assert wait_until(lambda: not pid_alive(pids[0]), 10), "backend process leaked"
        assert p.metric("edge_proxy_pending_requests") == 0
        # the supervisor notices the exit asynchronously
        assert wait_until(lambda: p.metric("edge_proxy_backend_process_up") == 0, 10)
        snap = p.snapshot()
        tl = snap["cold_starts"][-1]["milestones_seconds"]
        assert tl["process_start"] is not None and tl["listening"] is not None and tl["ready"] is None


def test_max_pending_rejects_overflow_at_once() -> None:
    cmd = f"{sys.executable} -m http.server {{port}} --bind 127.0.0.1"
    with ProxyThread(_settings(spawn=cmd, max_wait=3.0, max_pending=2)) as p:
        client = _openai(p.url)
        with cf.ThreadPoolExecutor(6) as ex:
            errors = list(ex.map(lambda _: _complete(client), range(6)))
        codes = sorted(e.body["code"] for e in errors if isinstance(e, openai.APIStatusError))  # type: ignore[index]
        assert len(codes) == 6
        assert codes.count("hold_full") == 4 and codes.count("hold_timeout") == 2
        assert p.metric("edge_proxy_cold_start_rejected_requests_total", reason="hold_full") == 4
        full = next(e for e in errors if e.body["code"] == "hold_full")  # type: ignore[union-attr,index]
        assert "max pending 2" in full.message  # type: ignore[union-attr]


def test_hold_without_backend_503_vs_plain_502() -> None:
    with ProxyThread(_settings(hold=True, max_wait=1.0)) as p:
        err = _complete(_openai(p.url))
        assert isinstance(err, openai.APIStatusError) and err.status_code == 503
        assert p.metric("edge_proxy_cold_starts_total", outcome="timeout") == 1
        assert p.metric("edge_proxy_pending_requests") == 0
    with ProxyThread(_settings()) as p:
        assert p.gate is None
        err = _complete(_openai(p.url))
        assert isinstance(err, openai.APIStatusError) and err.status_code == 502


def test_client_that_gives_up_leaves_no_held_request() -> None:
    with ProxyThread(_settings(hold=True, max_wait=30.0)) as p:
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(p.url + "/v1/completions", json={"model": "m", "prompt": "hi"}, timeout=1.0)
        assert wait_until(lambda: p.metric("edge_proxy_pending_requests") == 0, 10)
        assert p.snapshot()["pending_requests"] == 0
        assert p.metric("edge_proxy_cold_start_rejected_requests_total", reason="hold_timeout") == 0
