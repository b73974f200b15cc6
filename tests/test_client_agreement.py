"""What a real client measures agrees with what the proxy records (issue 15): for streamed chat
completions through the proxy to the real model server (tiny synthetic model), the openai SDK's
usage and content chunks give the same token counts as the proxy's record, to the token; the
client's time to first token and inter-token gaps agree with the proxy's within a generous bound
(the proxy stamps an event before it writes it, so its stamps never come after the client's).
The client runs in a worker thread and stamps chunks with the same monotonic clock as the proxy."""
from __future__ import annotations

import asyncio
import time

import openai
import pytest

from tests.proxy_support import metric_value, wait_until
from tests.running_proxy_support import running_proxy

pytestmark = pytest.mark.asyncio
BOUND_S = 0.25       # generous: the proxy -> client hop on 127.0.0.1 plus a busy 2-core machine


def _client_streams(url: str, model: str, n: int) -> list[dict]:
    out = []
    with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as c:
        for i in range(n):
            t_send = time.monotonic_ns()
            stream = c.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"count {i}"}], max_tokens=12,
                temperature=0.0, stream=True, stream_options={"include_usage": True})
            times, usage = [], None
            for ch in stream:
                now = time.monotonic_ns()
                if ch.usage is not None:
                    usage = ch.usage
                if ch.choices and ch.choices[0].delta.content:
                    times.append(now)
            out.append({"t_send": t_send, "times": times, "usage": usage})
    return out


async def test_tokens_ttft_itl_agree_with_openai_sdk(model_server):
    async with running_proxy(model_server.url) as px:
        async with openai.AsyncOpenAI(base_url=model_server.url + "/v1", api_key="x") as direct:
            model = (await direct.models.list()).data[0].id
        seen = await asyncio.to_thread(_client_streams, px.url, model, 5)
        await wait_until(lambda: len(px.components["recorder"].final) == len(seen), 10)
        await px.drain()
        recs = sorted(px.components["recorder"].final, key=lambda r: r.t_received_ns)
        assert len(recs) == len(seen)
        total_out = 0
        for rec, cl in zip(recs, seen):
            assert rec.outcome == "ok"
            # tokens: to the token (a chunk may carry the text of two tokens when a token is an
            # incomplete UTF-8 sequence, so content chunks are at most the tokens)
            assert cl["usage"] is not None
            assert rec.output_tokens == cl["usage"].completion_tokens
            assert rec.input_tokens == cl["usage"].prompt_tokens
            assert 0 < len(cl["times"]) <= rec.output_tokens == len(rec.token_times_ns)
            total_out += rec.output_tokens
            # TTFT: the proxy's first-token stamp precedes the client's, and is close to it
            assert rec.t_first_token_ns <= cl["times"][0]
            assert (cl["times"][0] - rec.t_first_token_ns) / 1e9 < BOUND_S
            assert rec.t_received_ns >= cl["t_send"]
            client_ttft = (cl["times"][0] - cl["t_send"]) / 1e9
            assert abs(client_ttft - rec.ttft_seconds) < BOUND_S
            # ITL: the decode spans (first to last token) agree, so do the mean gaps (TPOT)
            client_span = (cl["times"][-1] - cl["times"][0]) / 1e9
            proxy_span = (rec.t_last_token_ns - rec.t_first_token_ns) / 1e9
            assert abs(client_span - proxy_span) < BOUND_S
            assert rec.tpot_seconds is not None
            assert abs(rec.tpot_seconds - proxy_span / (rec.output_tokens - 1)) < 1e-9
        m = px.metrics_text()
        assert metric_value(m, "edge_proxy_tokens_total", type="output") == total_out
        assert metric_value(m, "edge_proxy_time_to_first_token_seconds_count") == len(recs)
        assert metric_value(m, "edge_proxy_inter_token_latency_seconds_count") == total_out - len(recs)
