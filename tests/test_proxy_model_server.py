"""The real model server (tiny synthetic model) behind the proxy: the official clients get the same
results through the proxy as directly, and streamed token counts/timelines come out right."""
from __future__ import annotations

import openai
import pytest
from text_generation import AsyncClient

from tests.proxy_support import metric_value
from tests.running_proxy_support import running_proxy

pytestmark = pytest.mark.asyncio
MSGS = [{"role": "user", "content": "hello there"}]


async def test_openai_client_direct_vs_proxy(model_server):
    async with running_proxy(model_server.url) as px:
        direct = openai.AsyncOpenAI(base_url=model_server.url + "/v1", api_key="x", max_retries=0)
        proxied = openai.AsyncOpenAI(base_url=px.url + "/v1", api_key="x", max_retries=0)
        model = (await direct.models.list()).data[0].id
        assert [m.id for m in (await proxied.models.list()).data] == [model]
        kw = dict(model=model, messages=MSGS, max_tokens=6, temperature=0.0)
        a = await direct.chat.completions.create(**kw)
        b = await proxied.chat.completions.create(**kw)
        assert a.choices[0].message.content == b.choices[0].message.content
        assert a.usage == b.usage
        sa = [c async for c in await direct.chat.completions.create(**kw, stream=True)]
        sb = [c async for c in await proxied.chat.completions.create(**kw, stream=True)]
        text = lambda chunks: "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)  # noqa: E731
        assert text(sa) == text(sb) == a.choices[0].message.content
        assert [c.usage for c in sa] == [c.usage for c in sb]      # no usage chunk added by the proxy
        await direct.close()
        await proxied.close()
        await px.drain()
        streamed = [r for r in px.components["recorder"].final if r.stream]
        (rec,) = streamed
        assert rec.token_count_source == "backend"
        assert rec.output_tokens == a.usage.completion_tokens
        assert rec.input_tokens == a.usage.prompt_tokens
        assert len(rec.token_times_ns) == rec.output_tokens
        assert (rec.t_received_ns < rec.t_forwarded_ns <= rec.t_backend_headers_ns
                <= rec.t_first_token_ns <= rec.t_last_token_ns <= rec.t_end_ns)
        text_m = px.metrics_text()
        assert metric_value(text_m, "edge_proxy_tokens_total", type="output") == 2 * a.usage.completion_tokens
        assert metric_value(text_m, "edge_proxy_in_flight_requests") == 0


async def test_tgi_client_direct_vs_proxy(model_server):
    async with running_proxy(model_server.url) as px:
        direct, proxied = AsyncClient(model_server.url, timeout=60), AsyncClient(px.url, timeout=60)
        a = await direct.generate("the quick", max_new_tokens=5)
        b = await proxied.generate("the quick", max_new_tokens=5)
        assert a.generated_text == b.generated_text
        assert a.details.generated_tokens == b.details.generated_tokens
        sa = [r async for r in direct.generate_stream("the quick", max_new_tokens=5)]
        sb = [r async for r in proxied.generate_stream("the quick", max_new_tokens=5)]
        assert [r.token.text for r in sa] == [r.token.text for r in sb]
        await px.drain()
        (rec,) = [r for r in px.components["recorder"].final if r.stream]
        assert rec.output_tokens == sb[-1].details.generated_tokens == len(rec.token_times_ns)
        assert rec.input_tokens is not None and rec.input_tokens > 0   # x-prompt-tokens header
        assert rec.token_times_ns == sorted(rec.token_times_ns)
        assert px.backend.kind == "model_server"
