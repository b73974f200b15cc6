"""Real client libraries through the proxy: a finished stream is recorded ``ok`` whatever the client
does after reading its terminator (issue 15). The openai SDK, huggingface_hub's InferenceClient
(both httpx-based) and text-generation (aiohttp) close their connection right after the stream's
last event; the proxy must not count that as a cancellation, a client disconnect or a span error.

The clients run in worker threads (their own event loops / blocking I/O), the proxy and the
upstream in the test's loop, like a separate client process would see them.
"""
from __future__ import annotations

import asyncio
import json

import openai
import pytest
from huggingface_hub import InferenceClient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from text_generation import Client as TGIClient

from tests.proxy_support import InProcessUpstream, metric_value, wait_until
from tests.running_proxy_support import running_proxy

pytestmark = pytest.mark.asyncio
N_STREAMS = 30
MSGS = [{"role": "user", "content": "alpha beta gamma"}]
SLOW_EOF = {"x-fake-fault": "slow-eof"}    # the backend ends its body 20 ms after the terminator


def _openai_streams(url: str, n: int) -> list[int]:
    """n streamed chat completions (new client each: its own connection); tokens seen per stream."""
    seen = []
    for _ in range(n):
        with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0,
                           default_headers=SLOW_EOF) as c:
            chunks = list(c.chat.completions.create(model="fake-model", messages=MSGS, max_tokens=5,
                                                    stream=True))
            seen.append(sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content))
    return seen


def _hub_streams(url: str, n: int) -> list[int]:
    seen = []
    for _ in range(n):
        c = InferenceClient(base_url=url, headers=SLOW_EOF)
        out = list(c.chat_completion(MSGS, max_tokens=5, stream=True))
        seen.append(sum(1 for ch in out if ch.choices and ch.choices[0].delta.content))
        tg = list(c.text_generation("alpha beta", max_new_tokens=4, stream=True, details=True))
        seen.append(len(tg))
    return seen


def _tgi_streams(url: str, n: int) -> list[int]:
    c = TGIClient(url, headers=SLOW_EOF, timeout=30)
    return [len(list(c.generate_stream("alpha beta", max_new_tokens=4))) for _ in range(n)]


@pytest.mark.parametrize("relay", ["raw", "aiohttp"])
@pytest.mark.parametrize("client", ["openai", "huggingface_hub", "text_generation"])
async def test_finished_streams_are_ok_for_real_clients(client, relay, tmp_path):
    fn = {"openai": _openai_streams, "huggingface_hub": _hub_streams,
          "text_generation": _tgi_streams}[client]
    log = tmp_path / "access.jsonl"
    spans = InMemorySpanExporter()
    async with InProcessUpstream() as up, running_proxy(up.url, span_exporter=spans, stream_relay=relay,
                                                        access_log=str(log)) as px:
        seen = await asyncio.to_thread(fn, px.url, N_STREAMS)
        assert all(n > 0 for n in seen)
        # the proxy may still be reading the backend's end of body when the client is done
        final = px.components["recorder"].final
        await wait_until(lambda: metric_value(px.metrics_text(), "edge_proxy_in_flight_requests") == 0,
                         timeout=10)
        await px.drain()
        recs = [r for r in final if r.stream]
        assert len(recs) == len(seen)
        bad = [(r.route, r.outcome, r.status, r.error_type) for r in recs if r.outcome != "ok"]
        assert not bad, f"{len(bad)} of {len(recs)} finished streams not ok: {bad[:3]}"
        assert all(r.status == 200 for r in recs)
        m = px.metrics_text()
        assert metric_value(m, "edge_proxy_requests_total", outcome="cancelled") == 0
        assert metric_value(m, "edge_proxy_client_disconnects_total") == 0
        assert metric_value(m, "edge_proxy_requests_total", outcome="ok", stream="true") == len(recs)
        # every finished stream with >1 token is in the TPOT histogram
        tpot_n = metric_value(m, "edge_proxy_time_per_output_token_seconds_count")
        assert tpot_n == sum(1 for r in recs if (r.output_tokens or 0) > 1)
    server_spans = [sp for sp in spans.get_finished_spans() if sp.kind == SpanKind.SERVER]
    assert len(server_spans) == len(recs)
    assert all(sp.status.status_code != StatusCode.ERROR for sp in server_spans)
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    assert len(lines) == len(recs) and {x["outcome"] for x in lines} == {"ok"}
