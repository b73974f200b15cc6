"""What the proxy records and answers matches what a real OpenAI-compatible backend (vLLM) and its
clients do (issue 15): the ``stream`` flag read the way the backend coerces it, requests held
during a cold start labelled with the backend's real model, errors the proxy makes in the route's
API format with messages a user can act on."""
from __future__ import annotations

import asyncio
import logging
import json
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import aiohttp
import openai
import pytest
from aiohttp import web

from edge_proxy.config import load_settings
from edge_proxy.proxy.server import build_proxy
from prometheus_client.parser import text_string_to_metric_families

from tests.net_support import free_port
from tests.proxy_support import MODEL, InProcessUpstream, make_app, metric_value, wait_until

pytestmark = pytest.mark.asyncio
MSGS = [{"role": "user", "content": "alpha beta"}]


def samples_of(text: str) -> list[Any]:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


@asynccontextmanager
async def proxy(url: str, **sections: Any) -> AsyncIterator[Any]:
    overrides: dict[tuple[str, str], Any] = {("proxy", "backend_url"): url, ("proxy", "port"): 0,
                                             ("proxy", "metrics_port"): 0,
                                             ("proxy", "access_log"): "none"}
    for key, v in sections.items():
        sec, _, name = key.partition("__")
        overrides[(sec, name)] = v
    rt = build_proxy(load_settings(None, overrides, environ={}))
    await rt.start()
    try:
        yield rt
    finally:
        await rt.stop()


@asynccontextmanager
async def vllm_like() -> AsyncIterator[InProcessUpstream]:
    """The fake upstream as an OpenAI-compatible server: no TGI /info, pydantic-lax booleans."""
    async with InProcessUpstream() as up:
        up.state.info_status = 404
        yield up


@pytest.mark.parametrize("flag", ["yes", "true", "1", 1, "on"])
async def test_stream_flag_coerced_like_the_backend(flag) -> None:
    async with vllm_like() as up, proxy(up.url) as rt:
        async with aiohttp.ClientSession() as s:
            async with s.post(rt.url + "/v1/chat/completions", json={
                    "model": MODEL, "messages": MSGS, "max_tokens": 4, "stream": flag}) as r:
                body = await r.read()
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        # the client did not ask for usage: it gets no usage chunk, as from the backend itself
        assert b'"usage": {' not in body and body.rstrip().endswith(b"data: [DONE]")
        assert up.state.requests[-1]["body"]["stream_options"] == {"include_usage": True}
        await wait_until(lambda: metric_value(rt.metrics_text(), "edge_proxy_requests_total") == 1)
        m = rt.metrics_text()
        assert metric_value(m, "edge_proxy_requests_total", stream="true", outcome="ok") == 1
        assert metric_value(m, "edge_proxy_tokens_total", type="output") == 4


async def test_stream_flag_no_is_not_a_stream() -> None:
    async with vllm_like() as up, proxy(up.url) as rt:
        async with aiohttp.ClientSession() as s:
            async with s.post(rt.url + "/v1/completions", json={
                    "model": MODEL, "prompt": "a b", "max_tokens": 3, "stream": "no"}) as r:
                assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 3
        assert "stream_options" not in up.state.requests[-1]["body"]
        await wait_until(lambda: metric_value(rt.metrics_text(), "edge_proxy_requests_total") == 1)
        assert metric_value(rt.metrics_text(), "edge_proxy_requests_total", stream="false", outcome="ok") == 1


async def test_held_requests_get_the_backends_model_label() -> None:
    port = free_port()
    async with proxy(f"http://127.0.0.1:{port}", coldstart__hold=True,
                     coldstart__max_wait_seconds=30.0) as rt:
        def call() -> str:
            with openai.OpenAI(base_url=rt.url + "/v1", api_key="x", max_retries=0, timeout=30) as c:
                chunks = list(c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=3,
                                                        stream=True))
                return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        task = asyncio.create_task(asyncio.to_thread(call))
        assert await wait_until(lambda: metric_value(rt.metrics_text(), "edge_proxy_pending_requests") == 1, 10)
        runner = web.AppRunner(make_app(), access_log=None)        # the backend comes up now
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            assert (await asyncio.wait_for(task, 30)).strip()
            await wait_until(lambda: metric_value(rt.metrics_text(), "edge_proxy_requests_total") == 1)
            await rt.core.drain()
            m = rt.metrics_text()
            assert metric_value(m, "edge_proxy_requests_total", model=MODEL, outcome="ok") == 1
            labelled = {s.labels.get("model") for s in samples_of(m) if "model" in s.labels}
            assert "unknown" not in labelled, labelled
        finally:
            await runner.cleanup()


async def test_proxy_errors_use_the_routes_api_format() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with proxy(dead) as rt:
        c = openai.AsyncOpenAI(base_url=rt.url + "/v1", api_key="x", max_retries=0)
        for call in (c.models.list(), c.models.retrieve(MODEL),
                     c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)):
            with pytest.raises(openai.APIStatusError) as ei:
                await call
            assert ei.value.status_code == 502
            err = ei.value.body
            assert isinstance(err, dict) and err["code"] == "connect", err
            assert "unreachable" in err["message"] and dead in err["message"]
        await c.close()
        async with aiohttp.ClientSession() as s:
            for path in ("/health",):          # /info is not forwarded by default (proxy.forward_routes)
                async with s.get(rt.url + path) as r:
                    body = await r.json()
                    assert r.status == 502 and body["error_type"] == "upstream" and dead in body["error"]
            async with s.get(rt.url + "/info") as r:          # not forwarded: a 404 in TGI's format
                body = await r.json()
                assert r.status == 404 and "forward_routes" in body["error"], body


async def test_broken_stream_message_is_actionable() -> None:
    async with InProcessUpstream() as up, proxy(up.url) as rt:
        with openai.OpenAI(base_url=rt.url + "/v1", api_key="x", max_retries=0,
                           default_headers={"x-fake-fault": "drop"}) as c:
            with pytest.raises(openai.APIError) as ei:
                await asyncio.to_thread(lambda: list(c.chat.completions.create(
                    model=MODEL, messages=MSGS, max_tokens=8, stream=True)))
        msg = str(ei.value)
        assert "closed the connection" in msg and "logs" in msg and up.url in msg, msg
        assert "broken" not in msg


@pytest.mark.parametrize("route", ["chat", "completions"])
async def test_client_sees_what_the_backend_would_have_sent(route) -> None:
    """vLLM puts system_fingerprint on the usage chunk when usage is asked for, on the terminal
    chunks otherwise: a client that did not ask for usage gets it where the backend would put it;
    the per-request queue time on the usage chunk is read."""
    async with vllm_like() as up, proxy(up.url) as rt:
        def both(url: str) -> list[Any]:
            with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as c:
                if route == "chat":
                    return list(c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=4,
                                                          stream=True))
                return list(c.completions.create(model=MODEL, prompt="a b", max_tokens=4, stream=True))
        direct = await asyncio.to_thread(both, up.url)
        proxied = await asyncio.to_thread(both, rt.url)
        assert [c.model_dump() for c in proxied] == [c.model_dump() for c in direct]
        assert [c.system_fingerprint for c in proxied][-1] == "fp_fake"
        assert all(c.usage is None for c in proxied)
        await wait_until(lambda: metric_value(rt.metrics_text(), "edge_proxy_requests_total") == 1)
        m = rt.metrics_text()
        assert metric_value(m, "edge_proxy_backend_queue_duration_seconds_sum") == pytest.approx(0.007)
        assert metric_value(m, "edge_proxy_tokens_total", type="output", source="backend") == 4


async def test_warns_when_a_per_model_key_matches_no_served_model(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="edge_proxy")
    async with vllm_like() as up, proxy(up.url, economics__scores={"llama-1b": 0.5, MODEL: 0.7},
                                        economics__reference_scores={"llama-1b": 0.9}) as rt:
        assert await wait_until(lambda: rt.backend.model == MODEL, 10)
        assert await wait_until(lambda: sum("llama-1b" in r.getMessage() for r in caplog.records) == 2, 5)
    lines = [r.getMessage() for r in caplog.records if "never used" in r.getMessage()]
    assert len(lines) == 2 and all(MODEL in x for x in lines)
    assert any(x.startswith("economics.scores has model 'llama-1b'") for x in lines)
    assert any(x.startswith("economics.reference_scores has model 'llama-1b'") for x in lines)


async def test_spawn_without_model_name_labels_the_cold_start_with_the_backends_model() -> None:
    """--spawn without --model-name: the held first requests and the cold start are labelled with
    the model the backend names once it is up, never model="unknown"."""
    import sys

    port = free_port()
    async with proxy(f"http://127.0.0.1:{port}",
                     coldstart__spawn=f"{sys.executable} -m tests.proxy_support --port {{port}}",
                     coldstart__max_wait_seconds=60.0) as rt:
        def call(i: int) -> int:
            with openai.OpenAI(base_url=rt.url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
                return c.completions.create(model="whatever", prompt=f"a {i}", max_tokens=2).usage.completion_tokens

        def done(n: int) -> bool:
            return metric_value(rt.metrics_text(), "edge_proxy_requests_total", route="/v1/completions") == n

        got = await asyncio.gather(*(asyncio.to_thread(call, i) for i in range(3)))
        assert got == [2, 2, 2]
        await wait_until(lambda: done(3), 10)
        # economics picks a finished cold start up from the gate when a later request ends
        gate = rt.components["coldstart"]
        # (the gate appends a cold start to its history after its energy window closed, a tick
        # after the first answers: an empty history is not "all finalized")
        await wait_until(lambda: len(gate.history) == 1 and all(cs.finalized for cs in gate.history), 10)
        assert await asyncio.to_thread(call, 9) == 2
        await wait_until(lambda: done(4), 10)
        await rt.core.drain()
        m = rt.metrics_text()
        assert metric_value(m, "edge_proxy_requests_total", model=MODEL, route="/v1/completions") == 4
        assert metric_value(m, "edge_proxy_economics_cold_starts_total", model=MODEL) == 1
        labelled = {s.labels.get("model") for s in samples_of(m) if "model" in s.labels}
        assert "unknown" not in labelled, labelled
