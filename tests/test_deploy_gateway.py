"""The scale-to-zero gateway as Kubernetes runs it (issue 20): a real ``edge-proxy serve --hold``
process in front of a backend that is down (the model server at zero replicas), real OpenAI clients.

- ``GET /edge/pending`` on the metrics port is what KEDA's metrics-api scaler reads: held requests
  count once (``demand_requests``), with their bytes;
- held request bodies are bounded by bytes (``--max-held-bytes``): over it, 503 + Retry-After;
- SIGTERM (a rollout or a node drain) hands every held request back with 503 + Retry-After
  (reason ``draining``) within ``--drain-seconds``, instead of failing or hanging them, and the
  process exits 0.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai

from tests.net_support import free_port, wait_http_ok

EDGE_PROXY = shutil.which("edge-proxy", path=str(Path(sys.executable).parent)) or "edge-proxy"
BODY_CHARS = 100_000          # one request's prompt: about 100 kB of body


def pending(mport: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/edge/pending", timeout=5) as r:
        return json.loads(r.read())


def test_gateway_bounds_held_bytes_and_hands_held_requests_back_on_sigterm(tmp_path: Path) -> None:
    port, mport, dead = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [EDGE_PROXY, "serve", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(mport),
         "--backend", f"http://127.0.0.1:{dead}", "--hold", "--max-pending", "50", "--max-wait", "120",
         "--max-held-bytes", str(int(2.5 * BODY_CHARS)), "--drain-seconds", "1", "--energy-source", "none"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    results: list[object] = []

    def ask() -> None:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                               timeout=60)
        try:
            client.chat.completions.create(model="m", max_tokens=1,
                                           messages=[{"role": "user", "content": "x" * BODY_CHARS}])
            results.append("ok")
        except openai.APIStatusError as exc:
            results.append(exc)
        except openai.APIError as exc:
            results.append(exc)

    try:
        wait_http_ok(f"http://127.0.0.1:{mport}/healthz", timeout=30, proc=proc)
        assert pending(mport)["demand_requests"] == 0
        held = [threading.Thread(target=ask) for _ in range(2)]
        for t in held:
            t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and pending(mport)["pending_requests"] < 2:
            time.sleep(0.05)
        snap = pending(mport)
        # Two held requests count as two (not pending + in flight = 4), with their bytes.
        assert snap["pending_requests"] == 2 and snap["demand_requests"] == 2, snap
        assert 2 * BODY_CHARS <= snap["held_request_bytes"] < 3 * BODY_CHARS, snap
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        assert f"edge_proxy_held_request_bytes {float(snap['held_request_bytes'])}" in metrics

        # A third body would pass the byte bound: 503 at once, with Retry-After.
        ask()
        third = results.pop()
        assert isinstance(third, openai.APIStatusError) and third.status_code == 503, third
        assert third.response.headers.get("retry-after") == "2"
        assert "max held bytes" in str(third)
        assert pending(mport)["pending_requests"] == 2

        # SIGTERM: the held requests come back as 503 + Retry-After, the process exits cleanly.
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in held:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in held), "held requests hung after SIGTERM"
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() - t_term < 20, proc.stderr.read()[-3000:]
        assert len(results) == 2, results
        for r in results:
            assert isinstance(r, openai.APIStatusError) and r.status_code == 503, r
            assert r.response.headers.get("retry-after") == "2"
            assert r.response.json()["error"]["code"] == "draining", r.response.text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_during_a_cold_start_lets_held_requests_finish(tiny_model_dir: str) -> None:
    """A gateway stopped while the backend is starting keeps what it holds for up to --drain-seconds:
    the backend comes up within it, the held request is released and answered 200 (a rollout
    during a cold start loses nothing)."""
    port, mport, backend = free_port(), free_port(), free_port()
    gw = subprocess.Popen(
        [EDGE_PROXY, "serve", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(mport),
         "--backend", f"http://127.0.0.1:{backend}", "--hold", "--max-wait", "120", "--drain-seconds", "90",
         "--energy-source", "none"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    server = None
    results: list[object] = []

    def ask() -> None:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="tiny", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
            results.append((raw.http_response.status_code, raw.headers.get("x-edge-cold-start")))
        except openai.APIError as exc:
            results.append(exc)

    try:
        wait_http_ok(f"http://127.0.0.1:{mport}/healthz", timeout=30, proc=gw)
        t = threading.Thread(target=ask)
        t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and pending(mport)["pending_requests"] < 1:
            time.sleep(0.05)
        assert pending(mport)["pending_requests"] == 1
        gw.send_signal(signal.SIGTERM)              # the rollout begins while the request is held
        time.sleep(1.0)
        assert gw.poll() is None, "the gateway exited without waiting for its held request"
        server = subprocess.Popen([sys.executable, "-m", "model_server", "serve", tiny_model_dir, "--host",
                                   "127.0.0.1", "--port", str(backend), "--device", "cpu", "--model-name", "tiny"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t.join(timeout=120)
        assert results == [(200, "true")], results
        assert gw.wait(timeout=60) == 0
    finally:
        for p in (gw, server):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
