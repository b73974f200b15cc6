"""Bad input gets a 4xx in each API's own error format; the server keeps serving afterwards."""
from __future__ import annotations

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(120)

LONG = "word " * 2000          # far beyond the tiny model's 512-token context

TGI_CASES = [
    ("malformed json", "/generate", b'{"inputs": "hi", ', 400),
    ("not an object", "/generate", b'["hi"]', 400),
    ("empty body", "/generate", b"", 400),
    ("missing inputs", "/generate", {"parameters": {"max_new_tokens": 2}}, 422),
    ("empty inputs", "/generate", {"inputs": ""}, 422),
    ("inputs not a string", "/generate", {"inputs": 42}, 422),
    ("parameters not an object", "/generate", {"inputs": "hi", "parameters": [1]}, 422),
    ("max_new_tokens zero", "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 0}}, 422),
    ("max_new_tokens string", "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": "5"}}, 422),
    ("temperature zero", "/generate", {"inputs": "hi", "parameters": {"temperature": 0}}, 422),
    ("top_p one", "/generate", {"inputs": "hi", "parameters": {"top_p": 1.0}}, 422),
    ("top_k negative", "/generate", {"inputs": "hi", "parameters": {"top_k": -3}}, 422),
    ("best_of 2", "/generate", {"inputs": "hi", "parameters": {"best_of": 2}}, 422),
    ("stop not strings", "/generate", {"inputs": "hi", "parameters": {"stop": [1, 2]}}, 422),
    ("prompt too long", "/generate", {"inputs": LONG, "parameters": {"max_new_tokens": 2}}, 422),
    ("prompt + new too long", "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 5000}}, 422),
    ("stream: missing inputs", "/generate_stream", {"parameters": {}}, 422),
    ("stream: prompt too long", "/generate_stream", {"inputs": LONG}, 422),
    ("root: empty inputs", "/", {"inputs": "   ", "stream": True}, 422),
]

OPENAI_CASES = [
    ("malformed json", "/v1/completions", b'{"prompt": ', 400, None),
    ("missing prompt", "/v1/completions", {"max_tokens": 2}, 400, "prompt"),
    ("empty prompt", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("empty prompt list", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("token id out of vocab", "/v1/completions", {"prompt": [1, 10**9]}, 400, "prompt"),
    ("model not a string", "/v1/completions", {"model": 17, "prompt": "hi"}, 400, "model"),
    ("logit_bias", "/v1/completions", {"prompt": "hi", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("max_tokens negative", "/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("temperature 3", "/v1/completions", {"prompt": "hi", "temperature": 3}, 400, "temperature"),
    ("top_p 0", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("n 2", "/v1/completions", {"prompt": "hi", "n": 2}, 400, "n"),
    ("stream not bool", "/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("stream_options without stream", "/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("five stops", "/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("prompt too long", "/v1/completions", {"prompt": LONG, "max_tokens": 2}, 400, "prompt"),
    ("chat missing messages", "/v1/chat/completions", {"max_tokens": 2}, 400, "messages"),
    ("chat empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("chat bad role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("chat empty content", "/v1/chat/completions", {"messages": [{"role": "user", "content": ""}]}, 400, "messages"),
    ("chat image part", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content"),
    ("chat response_format", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("chat too long", "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}], "max_tokens": 2}, 400, "messages"),
    ("chat max_tokens beyond context", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "max_tokens"),
]


def _post(url: str, body):
    if isinstance(body, bytes):
        return requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=30)
    return requests.post(url, json=body, timeout=30)


@pytest.mark.parametrize("name,path,body,status", TGI_CASES, ids=[c[0] for c in TGI_CASES])
def test_tgi_bad_input(model_server, name, path, body, status):
    r = _post(model_server.url + path, body)
    assert r.status_code == status, r.text
    err = r.json()
    assert set(err) == {"error", "error_type"} and err["error_type"] == "validation" and err["error"]


@pytest.mark.parametrize("name,path,body,status,param", OPENAI_CASES, ids=[c[0] for c in OPENAI_CASES])
def test_openai_bad_input(model_server, name, path, body, status, param):
    r = _post(model_server.url + path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param


def test_openai_client_raises_typed_errors(model_server):
    import openai

    client = openai.OpenAI(base_url=model_server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.NotFoundError):       # one model is served: any name generates
        client.models.retrieve("not-served")          # (docs/model_server.md, Compatibility)
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=client.models.list().data[0].id, prompt=LONG, max_tokens=2)
    assert exc.value.code == "context_length_exceeded"


def test_text_generation_client_raises_validation_error(model_server):
    from text_generation import Client
    from text_generation.errors import ValidationError

    with pytest.raises(ValidationError):
        Client(model_server.url, timeout=30).generate(LONG, max_new_tokens=2)


def test_unknown_route_and_method_are_json_4xx(model_server):
    r = requests.get(model_server.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    r = requests.get(model_server.url + "/generate", timeout=10)
    assert r.status_code == 405 and r.json()["error_type"] == "validation"


def test_still_serving_after_bad_inputs(model_server):
    r = requests.post(model_server.url + "/generate", json={"inputs": "ok", "parameters": {"max_new_tokens": 2}},
                      timeout=30)
    assert r.status_code == 200 and "generated_text" in r.json()
    assert model_server.proc.poll() is None


def test_deeply_nested_json_is_400(model_server):
    r = _post(model_server.url + "/generate", b"[" * 100000 + b"]" * 100000)
    assert r.status_code == 400 and r.json()["error_type"] == "validation"


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False, width=32)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8)
_tgi_bodies = st.fixed_dictionaries({}, optional={
    "inputs": _json_values | st.text(max_size=20), "stream": _json_values,
    "parameters": st.fixed_dictionaries({}, optional={
        k: _json_values for k in ("max_new_tokens", "temperature", "top_p", "top_k", "stop", "details",
                                  "do_sample", "seed", "truncate", "best_of", "return_full_text")})})
_openai_bodies = st.fixed_dictionaries({}, optional={
    "prompt": _json_values, "messages": _json_values, "model": _json_values, "stream": _json_values,
    "stream_options": _json_values, "stop": _json_values, "n": _json_values, "temperature": _json_values,
    "top_p": _json_values, "logprobs": _json_values})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_tgi_bodies, route=st.sampled_from(["/generate", "/generate_stream", "/"]))
def test_fuzz_tgi_never_5xx(model_server, body, route):
    params = body.get("parameters")
    if isinstance(params, dict) and isinstance(params.get("max_new_tokens"), int):
        params["max_new_tokens"] = min(params["max_new_tokens"], 4)   # keep generation short
    elif isinstance(params, dict):
        params["max_new_tokens"] = 2
    else:
        body["parameters"] = {"max_new_tokens": 2}
    r = requests.post(model_server.url + route, json=body, timeout=60)
    assert r.status_code < 500, (r.status_code, r.text[:300])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_openai_bodies, route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzz_openai_never_5xx(model_server, body, route):
    body["max_tokens"] = 2
    r = requests.post(model_server.url + route, json=body, timeout=60)
    assert r.status_code < 500, (r.status_code, r.text[:300])
