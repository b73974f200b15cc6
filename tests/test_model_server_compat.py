"""The model server with the clients people already use (issue 15, docs/model_server.md,
Compatibility): huggingface_hub's InferenceClient against a URL (it sends a placeholder model
name), openai's models.retrieve, the served name's default, and the one policy for parameters the
server does not implement (implemented or refused with a 400 naming it; never silently ignored)."""
from __future__ import annotations

import os

import openai
import pytest
import requests
from huggingface_hub import InferenceClient
from text_generation import Client as TGIClient
from text_generation.errors import ValidationError

MSGS = [{"role": "user", "content": "hello there"}]


def test_served_name_defaults_to_directory_basename(model_server, tiny_model_dir):
    ids = [m["id"] for m in requests.get(model_server.url + "/v1/models", timeout=10).json()["data"]]
    assert ids == [os.path.basename(tiny_model_dir.rstrip("/"))]
    info = requests.get(model_server.url + "/info", timeout=10).json()
    assert info["model_id"] == ids[0] and info["accepts_any_model_name"] is True


def test_huggingface_hub_inference_client(model_server):
    c = InferenceClient(base_url=model_server.url)
    out = c.chat_completion(MSGS, max_tokens=4)
    assert out.usage.completion_tokens == 4 and out.choices[0].message.content
    streamed = list(c.chat_completion(MSGS, max_tokens=4, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
    assert c.text_generation("hello", max_new_tokens=3, details=True).details.generated_tokens == 3


def test_openai_models_retrieve(model_server):
    c = openai.OpenAI(base_url=model_server.url + "/v1", api_key="x", max_retries=0)
    name = c.models.list().data[0].id
    assert c.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("no-such-model")
    # any name is accepted for generation: one model is served
    r = c.completions.create(model="dummy", prompt="a b", max_tokens=2)
    assert r.usage.completion_tokens == 2 and r.model == name


@pytest.mark.parametrize("param,value", [
    ("logit_bias", {"5": 10}), ("response_format", {"type": "json_object"}), ("suffix", "end"),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
])
def test_unsupported_openai_params_refused_by_name(model_server, param, value):
    c = openai.OpenAI(base_url=model_server.url + "/v1", api_key="x", max_retries=0)
    create = c.completions.create if param == "suffix" else c.chat.completions.create
    kw = {"prompt": "a b"} if param == "suffix" else {"messages": MSGS}
    with pytest.raises(openai.BadRequestError) as ei:
        create(model="m", max_tokens=2, **kw, **{param: value})
    assert ei.value.body["param"] == param and param in ei.value.body["message"]


def test_seed_policy(model_server):
    c = openai.OpenAI(base_url=model_server.url + "/v1", api_key="x", max_retries=0)
    engine = requests.get(model_server.url + "/info", timeout=10).json()["engine"]
    # greedy: deterministic whatever the seed
    a = c.completions.create(model="m", prompt="a b", max_tokens=4, temperature=0, seed=1)
    b = c.completions.create(model="m", prompt="a b", max_tokens=4, temperature=0, seed=2)
    assert a.choices[0].text == b.choices[0].text
    tgi = TGIClient(model_server.url, timeout=60)
    assert tgi.generate("a b", max_new_tokens=3, seed=5).details.seed is None   # not used: not echoed
    if engine == "fast":       # seeded sampling: the same seed, the same text
        kw = dict(model="m", prompt="a b", max_tokens=6, temperature=1.0, seed=7)
        assert c.completions.create(**kw).choices[0].text == c.completions.create(**kw).choices[0].text
        assert tgi.generate("a b", max_new_tokens=3, do_sample=True, seed=5).details.seed == 5
    else:                      # refused, naming the parameter and what to do
        with pytest.raises(openai.BadRequestError) as ei:
            c.completions.create(model="m", prompt="a b", max_tokens=4, temperature=1.0, seed=7)
        assert ei.value.body["param"] == "seed" and "--engine fast" in ei.value.body["message"]
        with pytest.raises(ValidationError):
            tgi.generate("a b", max_new_tokens=3, do_sample=True, seed=5)
