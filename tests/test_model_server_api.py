"""Model server APIs against the session tiny-model server: real openai and text_generation clients."""
from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import pytest
import requests

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _served_name(model_server) -> str:
    return requests.get(model_server.url + "/v1/models", timeout=10).json()["data"][0]["id"]


# ----------------------------------------------------------------------------- OpenAI
def test_openai_client_completions_and_chat(model_server, tokenizer):
    from openai import OpenAI

    client = OpenAI(base_url=model_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    models = client.models.list()
    name = models.data[0].id
    prompt = "def main():\n    import os"
    c = client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert c.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    assert c.usage.completion_tokens == 6
    assert c.usage.total_tokens == c.usage.prompt_tokens + 6
    assert c.choices[0].finish_reason == "length"
    assert isinstance(c.choices[0].text, str)

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    chat = client.chat.completions.create(model=name, messages=messages, max_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True})
    templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.usage.prompt_tokens == len(tokenizer(templated, add_special_tokens=False)["input_ids"])
    assert chat.usage.completion_tokens == 5
    assert chat.choices[0].message.role == "assistant"
    assert chat.object == "chat.completion"


def test_openai_streaming_usage_and_text_match(model_server):
    from openai import OpenAI

    client = OpenAI(base_url=model_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    name = _served_name(model_server)
    kwargs = dict(model=name, messages=[{"role": "user", "content": "count to ten"}], max_tokens=7,
                  temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0].choices == [] and chunks[-1] is usage_chunks[0]
    assert usage_chunks[0].usage.completion_tokens == full.usage.completion_tokens == 7
    assert usage_chunks[0].usage.prompt_tokens == full.usage.prompt_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content            # greedy: stream == non-stream
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]

    # without include_usage: no usage chunk at all
    plain = list(client.chat.completions.create(stream=True, **kwargs))
    assert all(getattr(c, "usage", None) is None for c in plain) and all(c.choices for c in plain)

    # completions streaming
    comp = list(client.completions.create(model=name, prompt="import sys", max_tokens=4, temperature=0,
                                          stream=True, extra_body={"ignore_eos": True}))
    assert [c.choices[0].finish_reason for c in comp][-1] == "length"
    assert len(comp) == 4                                       # one chunk per generated token


def test_openai_prompt_token_header_on_stream(model_server):
    r = requests.post(model_server.url + "/v1/completions", stream=True, timeout=30,
                      json={"prompt": "import os", "max_tokens": 2, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert int(r.headers["x-prompt-tokens"]) > 0
    body = r.text
    assert body.rstrip().endswith("data: [DONE]")


# ----------------------------------------------------------------------------- TGI
def test_text_generation_sync_and_async_clients(model_server, tokenizer):
    from text_generation import AsyncClient, Client

    prompt = "class Foo:\n    def"
    n_prompt = len(tokenizer(prompt)["input_ids"])
    sync = Client(model_server.url, timeout=60)
    r = sync.generate(prompt, max_new_tokens=6, decoder_input_details=True)
    assert r.details.generated_tokens == len(r.details.tokens) <= 6
    assert len(r.details.prefill) == n_prompt
    assert [t.id for t in r.details.prefill] == tokenizer(prompt)["input_ids"]
    assert r.generated_text == "".join(t.text for t in r.details.tokens)

    events = list(sync.generate_stream(prompt, max_new_tokens=6))
    assert events[-1].details is not None
    assert events[-1].generated_text == r.generated_text          # greedy: same text both ways
    assert [e.token.id for e in events] == [t.id for t in r.details.tokens]
    assert all(e.details is None for e in events[:-1])

    async def run_async():
        client = AsyncClient(model_server.url, timeout=60)
        res = await client.generate(prompt, max_new_tokens=6)
        streamed = [e async for e in client.generate_stream(prompt, max_new_tokens=6)]
        return res, streamed

    res, streamed = asyncio.run(run_async())
    assert res.generated_text == r.generated_text
    assert streamed[-1].details.generated_tokens == r.details.generated_tokens


def test_tgi_generate_object_details_and_header(model_server, tokenizer):
    prompt = "import json\n"
    r = requests.post(model_server.url + "/generate", timeout=30, json={
        "inputs": prompt, "parameters": {"max_new_tokens": 5, "details": True, "ignore_eos": True,
                                         "decoder_input_details": True, "return_full_text": True}})
    assert r.status_code == 200
    assert int(r.headers["x-prompt-tokens"]) == len(tokenizer(prompt)["input_ids"])
    body = r.json()
    assert isinstance(body, dict)                                 # /generate: object, / : list
    assert body["details"]["finish_reason"] == "length" and body["details"]["generated_tokens"] == 5
    assert len(body["details"]["prefill"]) == int(r.headers["x-prompt-tokens"])
    assert body["generated_text"].startswith(prompt)

    s = requests.post(model_server.url + "/generate_stream", timeout=30, stream=True,
                      json={"inputs": prompt, "parameters": {"max_new_tokens": 3, "ignore_eos": True}})
    assert s.headers["x-prompt-tokens"] == r.headers["x-prompt-tokens"]
    events = [json.loads(line[5:]) for line in s.text.splitlines() if line.startswith("data:")]
    assert len(events) == 3 and events[-1]["details"]["generated_tokens"] == 3


def test_stop_sequence_cuts_text_and_frees_engine(model_server):
    # find what greedy produces, then stop on a piece of it
    base = requests.post(model_server.url + "/generate", timeout=30, json={
        "inputs": "def f(x):", "parameters": {"max_new_tokens": 30, "details": True, "ignore_eos": True}}).json()
    text = base["generated_text"]
    tokens = base["details"]["tokens"]
    # a stop string that starts inside the text, after the first token's text
    start = len(tokens[0]["text"]) + 1
    assert len(text) > start + 2, "tiny model produced too little text for this test"
    stop = text[start:start + 2]
    cut = text.index(stop)
    r = requests.post(model_server.url + "/generate", timeout=30, json={
        "inputs": "def f(x):", "parameters": {"max_new_tokens": 30, "details": True, "stop": [stop],
                                              "ignore_eos": True}}).json()
    assert r["generated_text"] == text[:cut]
    assert r["details"]["finish_reason"] == "stop_sequence"
    assert r["details"]["generated_tokens"] < 30

    o = requests.post(model_server.url + "/v1/completions", timeout=30, json={
        "prompt": "def f(x):", "max_tokens": 30, "stop": stop, "temperature": 0, "ignore_eos": True}).json()
    assert o["choices"][0]["text"] == text[:cut] and o["choices"][0]["finish_reason"] == "stop"
    assert o["usage"]["completion_tokens"] == r["details"]["generated_tokens"]


# ----------------------------------------------------------------------------- info, health, metrics
def test_info_health_metrics(model_server, tiny_model_dir):
    info = requests.get(model_server.url + "/info", timeout=10).json()
    for key in ("model_id", "model_dtype", "model_device_type", "max_concurrent_requests", "max_input_tokens",
                "max_total_tokens", "version", "state", "ready", "architecture", "parameters",
                "weight_bytes", "quantization", "dtype", "engine", "devices", "synthetic", "startup",
                "load_energy_joules", "engine_warm"):
        assert key in info, key
    assert info["engine_warm"] is True                  # nothing warms up in the background here
    assert info["decode_attn_kernel"] is False          # SDPA on CPU unless MODEL_SERVER_FAST_DECODE_ATTN=1
    assert info["pick_kernel"] is False                 # the eager pick on CPU unless MODEL_SERVER_FAST_PICK_KERNEL=1
    assert info["norm_kernel"] is False                 # the fused op on CPU unless MODEL_SERVER_FAST_NORM=triton
    assert info["gemv_linears"] == 0                    # one-row bf16 linears on cuBLAS/CPU: the GEMV is CUDA-only
    assert info["switch_interval_seconds"] == pytest.approx(0.0005)     # serve's default, not Python's 0.005
    from safetensors import safe_open

    with safe_open(f"{tiny_model_dir}/model.safetensors", "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    # fp32 checkpoint served as-is: weight bytes as loaded == bytes stored; lm_head is tied
    assert info["weight_bytes"] == sum(t.numel() * t.element_size() for t in stored.values())
    assert info["parameters"] == sum(t.numel() for t in stored.values())
    assert info["quantization"] == "none" and info["dtype"] == "float32"
    assert info["devices"][0]["type"] == "cpu" and info["load_energy_joules"] is None
    st = info["startup"]
    assert st["process_start"] <= st["load_start"] <= st["load_end"] <= st["warmup_end"] <= st["ready"]
    assert requests.get(model_server.url + "/health", timeout=10).status_code == 200

    requests.post(model_server.url + "/generate", timeout=30, json={"inputs": "x = 1", "parameters": {"max_new_tokens": 2}})
    text = requests.get(model_server.url + "/metrics", timeout=10).text
    names = set(re.findall(r"^(model_server_[a-z_]+?)(?:_bucket|_count|_sum|_total|_created)?[{ ]", text, re.M))
    for name in ("model_server_requests", "model_server_queue_seconds", "model_server_prefill_seconds",
                 "model_server_decode_seconds", "model_server_batch_size", "model_server_generation_tokens",
                 "model_server_prompt_tokens", "model_server_weight_bytes"):
        assert name in names, name
    success = re.search(r'^model_server_requests_total\{api="tgi",status="success"\} (\S+)', text, re.M)
    assert success and float(success.group(1)) >= 1


@pytest.mark.parametrize("n", [8])
def test_concurrent_requests_all_complete(model_server, n):
    async def go():
        async with aiohttp.ClientSession() as s:
            async def one(i):
                async with s.post(model_server.url + "/v1/completions", json={
                        "prompt": f"value_{i} = ", "max_tokens": 8, "temperature": 0, "ignore_eos": True}) as r:
                    return r.status, await r.json()
            return await asyncio.gather(*[one(i) for i in range(n)])

    results = asyncio.run(go())
    assert all(status == 200 for status, _ in results)
    assert all(body["usage"]["completion_tokens"] == 8 for _, body in results)


def test_sampling_requests_work_next_to_greedy(model_server):
    r = requests.post(model_server.url + "/generate", timeout=60, json={
        "inputs": "import os", "parameters": {"max_new_tokens": 6, "do_sample": True, "temperature": 0.7,
                                             "top_k": 20, "top_p": 0.9, "details": True, "ignore_eos": True}})
    assert r.status_code == 200 and r.json()["details"]["generated_tokens"] == 6
    o = requests.post(model_server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 1.3, "ignore_eos": True})
    assert o.status_code == 200 and o.json()["usage"]["completion_tokens"] == 4
