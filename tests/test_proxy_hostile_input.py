"""Hostile input on the proxy's request path: answered with one 4xx in the API's own format, never
a 500, a stack trace or a mixed-up request (JSON bombs, spoofed request ids, feedback abuse)."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from tests.proxy_support import InProcessUpstream
from tests.running_proxy_support import running_proxy

pytestmark = pytest.mark.asyncio
TOKEN = "fb-secret"

DEEP_ARRAY = b"[" * 1000 + b"]" * 1000                   # 2 KB, nested 1,000 deep
DEEP_OBJECT = b'{"a":' * 1000 + b"1" + b"}" * 1000
DEEP_IN_FIELD = b'{"model":"m","prompt":"x","extra":' + DEEP_ARRAY + b"}"


def _openai_error(status: int, body: bytes) -> dict[str, Any]:
    obj = json.loads(body)
    assert set(obj) == {"error"} and isinstance(obj["error"]["message"], str), obj
    assert obj["error"]["type"] == "invalid_request_error"
    return obj


def _tgi_error(body: bytes) -> dict[str, Any]:
    obj = json.loads(body)
    assert set(obj) == {"error", "error_type"} and obj["error_type"] == "validation", obj
    return obj


@pytest.mark.parametrize("bomb", [DEEP_ARRAY, DEEP_OBJECT, DEEP_IN_FIELD])
async def test_deeply_nested_json_is_a_400_in_the_api_format(bomb: bytes, caplog) -> None:
    async with InProcessUpstream() as up, running_proxy(up.url) as px:
        async with aiohttp.ClientSession() as s:
            for path in ("/v1/chat/completions", "/v1/completions"):
                async with s.post(px.url + path, data=bomb,
                                  headers={"Content-Type": "application/json"}) as r:
                    body = await r.read()
                    assert r.status == 400, (path, r.status, body[:200])
                    assert r.headers["Content-Type"].startswith("application/json")
                    _openai_error(400, body)
            for path in ("/generate", "/generate_stream", "/"):
                async with s.post(px.url + path, data=bomb,
                                  headers={"Content-Type": "application/json"}) as r:
                    body = await r.read()
                    assert r.status == 400, (path, r.status, body[:200])
                    _tgi_error(body)
        assert up.state.requests == []                       # nothing reached the backend
    assert "RecursionError" not in caplog.text and "Traceback" not in caplog.text


class _FeedbackProxy:
    """A started proxy with feedback enabled (economics.feedback_token)."""

    def __init__(self, backend_url: str) -> None:
        from edge_proxy.config import load_settings
        from edge_proxy.proxy.server import build_proxy

        settings = load_settings(None, {("proxy", "backend_url"): backend_url, ("proxy", "port"): 0,
                                        ("proxy", "metrics_port"): 0, ("proxy", "access_log"): "none",
                                        ("energy", "source"): "none",
                                        ("economics", "feedback_token"): TOKEN}, environ={})
        self.runtime = build_proxy(settings)

    async def __aenter__(self) -> Any:
        await self.runtime.start()
        return self.runtime

    async def __aexit__(self, *exc: object) -> None:
        await self.runtime.stop()


AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


async def test_feedback_rejects_json_bombs_and_non_numbers() -> None:
    async with InProcessUpstream() as up, _FeedbackProxy(up.url) as px:
        async with aiohttp.ClientSession() as s:
            async with s.post(px.url + "/v1/completions",
                              json={"model": "fake-model", "prompt": "a b", "max_tokens": 2}) as r:
                assert r.status == 200
                rid = r.headers["x-edge-request-id"]
            await px.drain()
            bad = [DEEP_ARRAY, DEEP_OBJECT,
                   json.dumps({"request_id": rid, "score": "0.5"}).encode(),
                   json.dumps({"request_id": rid, "score": True}).encode(),
                   b'{"request_id": "%s", "score": NaN}' % rid.encode(),
                   b'{"request_id": "%s", "score": Infinity}' % rid.encode(),
                   json.dumps({"request_id": rid, "score": 1.5}).encode(),
                   json.dumps({"request_id": 7, "score": 0.5}).encode()]
            for body in bad:
                async with s.post(px.url + "/edge/feedback", data=body, headers=AUTH) as r:
                    text = await r.read()
                    assert r.status == 400, (body[:60], r.status, text[:200])
                    assert "error" in json.loads(text)
            async with s.post(px.url + "/edge/feedback", json={"request_id": rid, "score": 0.5},
                              headers=AUTH) as r:
                assert r.status == 200, await r.text()


async def test_one_client_id_on_many_requests_shares_nothing() -> None:
    """20 concurrent requests that all send x-request-id "same": each gets its own proxy id and
    its own energy (the ledger is keyed by the proxy's id), and feedback takes one score each."""
    from pathlib import Path

    from edge_proxy.config import load_settings
    from edge_proxy.proxy.server import build_proxy
    from tests.running_proxy_support import RecordingObserver

    trace = Path(__file__).parent / "data" / "energy_h100_synthetic.jsonl"
    async with InProcessUpstream() as up:
        settings = load_settings(None, {
            ("proxy", "backend_url"): up.url, ("proxy", "port"): 0, ("proxy", "metrics_port"): 0,
            ("proxy", "access_log"): "none", ("energy", "source"): "replay",
            ("energy", "replay_path"): str(trace), ("energy", "period_seconds"): 0.05,
            ("energy", "idle_watts"): 50.0, ("economics", "feedback_token"): TOKEN}, environ={})
        px = build_proxy(settings)
        finals = RecordingObserver()
        px.observers.append(finals)
        await px.start()
        try:
            async with aiohttp.ClientSession() as s:
                async def one(i: int) -> str:
                    body = {"model": "fake-model", "stream": True, "max_tokens": 8,
                            "messages": [{"role": "user", "content": f"n{i} x"}]}
                    async with s.post(px.url + "/v1/chat/completions", json=body,
                                      headers={"x-request-id": "same"}) as r:
                        assert r.status == 200
                        assert r.headers["x-request-id"] == "same"
                        await r.read()
                        return r.headers["x-edge-request-id"]

                await asyncio.sleep(0.5)        # the replay sampler has ticked: energy to share
                ids = await asyncio.gather(*(one(i) for i in range(20)))
                assert len(set(ids)) == 20 and "same" not in ids
                for _ in range(100):            # energy turns final a tick after each end
                    await px.drain()
                    if len(finals.final) == 20 and all(
                            r.energy is not None and not r.energy.provisional for r in finals.final):
                        break
                    await asyncio.sleep(0.05)
                assert sorted(r.request_id for r in finals.final) == sorted(ids)
                assert all(r.client_request_id == "same" for r in finals.final)
                joules = [r.energy.full_joules for r in finals.final if r.energy is not None]
                assert len(joules) == 20 and min(joules) > 0, joules
                # feedback: the proxy's id, once
                for rid in ids[:3]:
                    async with s.post(px.url + "/edge/feedback", json={"request_id": rid, "score": 1},
                                      headers=AUTH) as r:
                        assert r.status == 200, await r.text()
                    async with s.post(px.url + "/edge/feedback", json={"request_id": rid, "score": 0},
                                      headers=AUTH) as r:
                        assert r.status == 409
                async with s.post(px.url + "/edge/feedback", json={"request_id": "same", "score": 1},
                                  headers=AUTH) as r:
                    assert r.status == 404
        finally:
            await px.stop()
