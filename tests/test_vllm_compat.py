"""Compatibility of the proxy with an OpenAI-compatible backend as vLLM behaves (issue 15).

Always runs against the test upstream in vLLM mode (no TGI ``/info``, pydantic-lax booleans,
``system_fingerprint`` and per-request metrics where vLLM puts them). With ``EDGE_EVAL_VLLM_URL``
set (``scripts/check_vllm.sh`` starts a real vLLM on the CPU and sets it), every test also runs
against that server: what the official client gets through the proxy equals what it gets directly,
and the proxy's counts equal the backend's.
"""
from __future__ import annotations

import asyncio
import os
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import aiohttp
import openai
import pytest

from edge_proxy.config import load_settings
from edge_proxy.proxy.server import build_proxy
from tests.proxy_support import InProcessUpstream, metric_value, wait_until

pytestmark = pytest.mark.asyncio
VLLM_URL = os.environ.get("EDGE_EVAL_VLLM_URL", "").rstrip("/")
BACKENDS = ["fake-vllm"] + (["vllm"] if VLLM_URL else [])
MSGS = [{"role": "user", "content": "hello there"}]


@asynccontextmanager
async def backend(kind: str) -> AsyncIterator[str]:
    if kind == "vllm":
        yield VLLM_URL
        return
    async with InProcessUpstream() as up:
        up.state.info_status = 404          # no TGI /info, like vLLM
        yield up.url


@asynccontextmanager
async def proxy(url: str) -> AsyncIterator[Any]:
    rt = build_proxy(load_settings(None, {
        ("proxy", "backend_url"): url, ("proxy", "port"): 0, ("proxy", "metrics_port"): 0,
        ("proxy", "access_log"): "none"}, environ={}))
    await rt.start()
    try:
        yield rt
    finally:
        await rt.stop()


def _norm(chunk: Any) -> dict[str, Any]:
    """A chunk without what differs between two runs (id, time, generated text)."""
    d = chunk.model_dump()
    d.pop("id", None)
    d.pop("created", None)
    for ch in d.get("choices") or []:
        ch.pop("text", None)
        ch.pop("token_ids", None)
        if isinstance(ch.get("delta"), dict):
            ch["delta"].pop("content", None)
    return d


async def _settled(rt: Any, n: int) -> str:
    """Metrics once ``n`` generation requests have ended and their bookkeeping ran."""
    def ended() -> bool:
        m = rt.metrics_text()
        return (metric_value(m, "edge_proxy_in_flight_requests") == 0
                and sum(metric_value(m, "edge_proxy_requests_total", route=r)
                        for r in ("/v1/completions", "/v1/chat/completions")) >= n)
    await rt.core.drain()
    await wait_until(ended, 15)
    return rt.metrics_text()


@pytest.mark.parametrize("kind", BACKENDS)
async def test_streams_match_direct_without_usage(kind) -> None:
    async with backend(kind) as url, proxy(url) as rt:
        def run(base: str) -> tuple[str, list[Any]]:
            with openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60) as c:
                model = c.models.list().data[0].id
                return model, list(c.chat.completions.create(
                    model=model, messages=MSGS, max_tokens=6, temperature=0.0, stream=True))
        model, direct = await asyncio.to_thread(run, url)
        _, proxied = await asyncio.to_thread(run, rt.url)
        # (a random-weight model's greedy text can differ between two runs of a real server on
        # CPU: near-tie logits; so the chunks are compared without their text)
        assert _norm(proxied[-1]) == _norm(direct[-1])
        assert {k for c in proxied for k in c.model_dump(exclude_none=True)} == \
            {k for c in direct for k in c.model_dump(exclude_none=True)}
        fp = lambda chunks: [(c.system_fingerprint, c.choices[0].finish_reason if c.choices else None)  # noqa: E731
                             for c in chunks if c.system_fingerprint is not None]
        assert fp(proxied) == fp(direct)
        assert all(c.usage is None for c in proxied)
        m = await _settled(rt, 1)
        assert metric_value(m, "edge_proxy_requests_total", stream="true", outcome="ok") == 1
        assert metric_value(m, "edge_proxy_tokens_total", type="output", source="backend") == 6


@pytest.mark.parametrize("kind", BACKENDS)
async def test_stream_flag_yes_streams_and_is_recorded(kind) -> None:
    async with backend(kind) as url, proxy(url) as rt:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x") as c:
            model = (await c.models.list()).data[0].id
        async with aiohttp.ClientSession() as s:
            async with s.post(rt.url + "/v1/completions", json={
                    "model": model, "prompt": "a b", "max_tokens": 5, "stream": "yes"}) as r:
                body = await r.read()
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        assert body.rstrip().endswith(b"data: [DONE]") and b'"usage":{' not in body.replace(b" ", b"")
        m = await _settled(rt, 1)
        assert metric_value(m, "edge_proxy_requests_total", stream="true", outcome="ok") == 1
        assert metric_value(m, "edge_proxy_tokens_total", type="output") == 5


@pytest.mark.parametrize("kind", BACKENDS)
async def test_queue_time_read_from_stream_usage(kind) -> None:
    async with backend(kind) as url, proxy(url) as rt:
        def run() -> int:
            with openai.OpenAI(base_url=rt.url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
                model = c.models.list().data[0].id
                chunks = list(c.completions.create(model=model, prompt="a b", max_tokens=4,
                                                   stream=True, stream_options={"include_usage": True}))
                return chunks[-1].usage.completion_tokens
        assert await asyncio.to_thread(run) == 4
        m = await _settled(rt, 1)
        # vLLM needs --enable-per-request-metrics (scripts/check_vllm.sh sets it)
        assert metric_value(m, "edge_proxy_backend_queue_duration_seconds_count") == 1


@pytest.mark.parametrize("kind", BACKENDS)
async def test_bad_request_body_passes_through(kind) -> None:
    async with backend(kind) as url, proxy(url) as rt:
        async with aiohttp.ClientSession() as s:
            bodies = []
            for base in (url, rt.url):
                async with s.get(base + "/v1/models/no-such-model") as r:
                    bodies.append((r.status, await r.read()))
        assert bodies[0] == bodies[1]
