"""Every labelled counter whose label values are known up front exists at 0 before its first
increment (issue 15): Prometheus' rate()/increase() cannot see the increment that creates a series,
so a series born at 1 (one feedback, one upstream error) reads as no change. Checked on the real
/metrics exposition of a running proxy; the request is sent with the openai SDK."""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_proxy.config import load_settings
from edge_proxy.proxy.server import build_proxy
from tests.proxy_support import InProcessUpstream, wait_until

pytestmark = pytest.mark.asyncio


def samples(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[frozenset(s.labels.items())] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    """The sample's value, or None when the series does not exist."""
    for lab, v in samples(text, name).items():
        if all((k, val) in lab for k, val in labels.items()):
            return v
    return None


@asynccontextmanager
async def proxy(url: str) -> AsyncIterator[Any]:
    rt = build_proxy(load_settings(None, {
        ("proxy", "backend_url"): url, ("proxy", "port"): 0, ("proxy", "metrics_port"): 0,
        ("proxy", "access_log"): "none", ("proxy", "model_name"): "m",
        ("economics", "feedback_token"): "t", ("economics", "scores"): {"m": 0.5},
        ("coldstart", "hold"): True}, environ={}))
    await rt.start()
    try:
        yield rt
    finally:
        await rt.stop()


async def test_known_label_values_start_at_zero() -> None:
    async with InProcessUpstream() as up, proxy(up.url) as rt:
        m = rt.metrics_text()
        for outcome in ("accepted", "bad_request", "disabled", "unauthorized", "unknown_request"):
            assert value(m, "edge_proxy_feedback_total", outcome=outcome) == 0, outcome
        assert value(m, "edge_proxy_quality_score_count", model="m", source="feedback") == 0
        for t in ("connect", "timeout", "upstream_status", "stream_broken"):
            assert value(m, "edge_proxy_upstream_errors_total", type=t) == 0, t
        for o in ("idle_stop", "crash", "start_failed", "shutdown"):
            assert value(m, "edge_proxy_backend_process_exits_total", outcome=o) == 0, o
        for name in ("edge_proxy_economics_requests_total", "edge_proxy_economics_cold_starts_total",
                     "edge_proxy_cold_start_cost_usd_total"):
            assert value(m, name, model="m") == 0, name

        # a (model, route) seen for the first time: its ok series exist while the request runs
        up.state.release = asyncio.Event()

        def one_stream() -> int:
            with openai.OpenAI(base_url=rt.url + "/v1", api_key="x", max_retries=0,
                               default_headers={"x-fake-fault": "hold-first"}) as c:
                chunks = list(c.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "a b"}], max_tokens=3, stream=True))
                return sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content)

        task = asyncio.create_task(asyncio.to_thread(one_stream))
        assert await wait_until(lambda: len(up.state.requests) == 1, 10)
        m = rt.metrics_text()
        route = "/v1/chat/completions"
        assert value(m, "edge_proxy_requests_total", model="m", route=route, stream="true",
                     status="200", outcome="ok") == 0
        assert value(m, "edge_proxy_tokens_total", model="m", route=route, type="output") == 0
        assert value(m, "edge_proxy_time_to_first_token_seconds_count", model="m", route=route) == 0
        up.state.release.set()
        assert await task == 3
        await wait_until(lambda: value(rt.metrics_text(), "edge_proxy_requests_total", model="m",
                                       route=route, outcome="ok") == 1, 10)

        # one feedback post: the series it lands in existed before at 0
        async with aiohttp.ClientSession() as s:
            async with s.post(rt.url + "/edge/feedback", json={"request_id": "nope", "score": 1},
                              headers={"Authorization": "Bearer t"}) as r:
                assert r.status == 404
        m = rt.metrics_text()
        assert value(m, "edge_proxy_feedback_total", outcome="unknown_request") == 1
