"""What the public port exposes: only the inference APIs and health are forwarded by default
(the backend's /metrics, /energy, /info and admin routes are not), and spans are named after the
served model, never the client's free-form model string."""
from __future__ import annotations

import json

import aiohttp
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from edge_proxy.config import ConfigError, load_settings
from tests.proxy_support import InProcessUpstream
from tests.running_proxy_support import running_proxy



async def _status(s: aiohttp.ClientSession, method: str, url: str) -> tuple[int, bytes]:
    async with s.request(method, url) as r:
        return r.status, await r.read()


@pytest.mark.asyncio
async def test_default_forwards_only_the_inference_apis() -> None:
    async with InProcessUpstream() as up, running_proxy(up.url) as px:
        async with aiohttp.ClientSession() as s:
            for path in ("/metrics", "/energy", "/info", "/echo/secret", "/v1/load_lora_adapter",
                         "/admin", "/v1/../info"):
                for method in ("GET", "POST"):
                    status, body = await _status(s, method, px.url + path)
                    assert status == 404, (method, path, status)
                    obj = json.loads(body)
                    assert "error" in obj
            status, body = await _status(s, "GET", px.url + "/v1/load_lora_adapter")
            assert json.loads(body)["error"]["code"] == "not_forwarded"      # OpenAI format on /v1/*
            assert (await _status(s, "GET", px.url + "/health"))[0] == 200
            assert (await _status(s, "GET", px.url + "/v1/models"))[0] == 200
            async with s.post(px.url + "/generate", json={"inputs": "a b"}) as r:
                assert r.status == 200
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await s.ws_connect(px.url + "/ws")                             # upgrades too
            assert err.value.status == 404
        # (the proxy's own port serves its own metrics: a different port by default)
        assert not any(r["path"].startswith("/echo") for r in up.state.requests)


@pytest.mark.asyncio
async def test_forward_routes_setting_opens_routes() -> None:
    async with InProcessUpstream() as up, running_proxy(up.url, forward_routes="/echo/*,/info") as px:
        async with aiohttp.ClientSession() as s:
            assert (await _status(s, "POST", px.url + "/echo/x"))[0] == 200
            assert (await _status(s, "GET", px.url + "/info"))[0] == 200
            assert (await _status(s, "POST", px.url + "/generate"))[0] == 404   # not listed now


def test_forward_routes_patterns_are_checked() -> None:
    for bad in (["info"], ["/a*b"]):
        with pytest.raises(ConfigError, match="forward_routes"):
            load_settings(None, {("proxy", "forward_routes"): bad}, environ={})


@pytest.mark.asyncio
async def test_span_name_is_the_served_model_not_the_clients_string() -> None:
    exporter = InMemorySpanExporter()
    async with InProcessUpstream() as up, running_proxy(up.url, span_exporter=exporter) as px:
        async with aiohttp.ClientSession() as s:
            for i in range(5):
                body = {"model": f"made-up-{i}-" + "x" * 1000, "prompt": "a b", "max_tokens": 2}
                async with s.post(px.url + "/v1/completions", json=body) as r:
                    assert r.status == 200
        await px.drain()
        spans = exporter.get_finished_spans()
        assert len(spans) == 5
        assert {sp.name for sp in spans} == {"text_completion fake-model"}
        assert all(len(sp.attributes["gen_ai.request.model"]) <= 256 for sp in spans)
