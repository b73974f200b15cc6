"""Economics counts only requests the backend answered (issue 15, docs/metrics.md): a client that
gives up while its request is held by the cold-start gate, or before the backend's response
headers, was never served: no request, tokens or joules in economics. The openai SDK is the client.
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import openai
import pytest

from edge_proxy.config import load_settings
from edge_proxy.proxy.server import build_proxy
from tests.net_support import free_port
from tests.proxy_support import InProcessUpstream, metric_value, wait_until

pytestmark = pytest.mark.asyncio
MSGS = [{"role": "user", "content": "alpha beta"}]


@asynccontextmanager
async def proxy(url: str, **coldstart: Any) -> AsyncIterator[Any]:
    overrides: dict[tuple[str, str], Any] = {("proxy", "backend_url"): url, ("proxy", "port"): 0,
                                             ("proxy", "metrics_port"): 0,
                                             ("proxy", "access_log"): "none",
                                             ("proxy", "model_name"): "m"}
    overrides.update({("coldstart", k): v for k, v in coldstart.items()})
    rt = build_proxy(load_settings(None, overrides, environ={}))
    await rt.start()
    try:
        yield rt
    finally:
        await rt.stop()


def _give_up(url: str, timeout: float, stream: bool, headers: dict[str, str] | None = None) -> str:
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=timeout,
                      default_headers=headers or {})
    try:
        r = c.chat.completions.create(model="m", messages=MSGS, max_tokens=4, stream=stream)
        if stream:
            list(r)
        return "answered"
    except openai.APITimeoutError:
        return "gave up"
    finally:
        c.close()


async def _settled(rt: Any, n: int) -> str:
    await wait_until(lambda: metric_value(rt.metrics_text(), "edge_proxy_requests_total") >= n, 10)
    await rt.core.drain()
    return rt.metrics_text()


async def test_client_gives_up_before_response_headers() -> None:
    async with InProcessUpstream() as up, proxy(up.url) as rt:
        # the backend sends no headers for 30 s ("slow"); the client gives up after 0.5 s
        for stream in (False, True):
            got = await asyncio.to_thread(_give_up, rt.url, 0.5, stream, {"x-fake-fault": "slow"})
            assert got == "gave up"
        m = await _settled(rt, 2)
        assert metric_value(m, "edge_proxy_requests_total", outcome="cancelled") == 2
        assert metric_value(m, "edge_proxy_economics_requests_total") == 0
        assert metric_value(m, "edge_proxy_economics_energy_joules_total") == 0
        assert metric_value(m, "edge_proxy_api_equivalent_cost_usd_total") == 0
        # control: an answered request is counted
        assert await asyncio.to_thread(_give_up, rt.url, 10, True) == "answered"
        m = await _settled(rt, 3)
        assert metric_value(m, "edge_proxy_economics_requests_total", model="m") == 1
        assert metric_value(m, "edge_proxy_economics_tokens_total", model="m", type="output") == 4


async def test_client_gives_up_while_held() -> None:
    down = f"http://127.0.0.1:{free_port()}"          # nothing listens: the request is held
    async with proxy(down, hold=True, max_wait_seconds=30.0) as rt:
        got = await asyncio.to_thread(_give_up, rt.url, 0.5, True)
        assert got == "gave up"
        m = await _settled(rt, 1)
        assert metric_value(m, "edge_proxy_requests_total", outcome="cancelled") == 1
        assert metric_value(m, "edge_proxy_economics_requests_total") == 0
        assert metric_value(m, "edge_proxy_economics_tokens_total") == 0
