"""``serve --engine fast`` without transformers (model_server.native), issue 17: in the server process,
``transformers`` is not imported after completed requests (``/info`` ``transformers_imported``), and the API
answers (OpenAI completions and chat, streamed and not; TGI generate with prompt-token details, and its stream)
are identical to the transformers path's (``MODEL_SERVER_NO_TRANSFORMERS=0``) for the same prompts. Also an
API worker process loads the native tokenizer. CPU, the tiny preset."""
from __future__ import annotations

import contextlib
import json
import urllib.request
from typing import Iterator

import pytest

from tests.conftest import ModelServerProcess, start_model_server

PROMPTS = ["def main(", "héllo wörld 😀", "  leading spaces and\ttabs\n", "<s>special</s> <|im_end|> text",
           "import os\nimport sys\n\nclass"]
VOLATILE = {"id", "created", "system_fingerprint"}


@pytest.fixture(scope="module")
def servers(tiny_model_dir) -> Iterator[dict[str, ModelServerProcess]]:
    with contextlib.ExitStack() as stack:
        out = {"native": stack.enter_context(start_model_server(tiny_model_dir, "--engine", "fast", "--max-batch", "8"))}
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MODEL_SERVER_NO_TRANSFORMERS", "0")      # read by the child at its start
            out["transformers"] = stack.enter_context(
                start_model_server(tiny_model_dir, "--engine", "fast", "--max-batch", "8"))
        yield out


def _post(url: str, body: dict) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _info(server: ModelServerProcess) -> dict:
    with urllib.request.urlopen(server.url + "/info", timeout=10) as r:
        return json.load(r)


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def _answers(server: ModelServerProcess) -> list:
    """Every answer for every prompt, volatile fields (ids, timestamps) removed; SSE streams as event lists."""
    out = []
    for p in PROMPTS:
        calls = [
            ("/v1/completions", {"model": "m", "prompt": p, "max_tokens": 12, "temperature": 0}),
            ("/v1/completions", {"model": "m", "prompt": p, "max_tokens": 10, "temperature": 0, "stream": True}),
            ("/v1/chat/completions", {"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                                                  {"role": "user", "content": p}],
                                      "max_tokens": 10, "temperature": 0}),
            ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": p}], "max_tokens": 8,
                                      "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}),
            ("/generate", {"inputs": p, "parameters": {"max_new_tokens": 10, "details": True,
                                                      "decoder_input_details": True}}),
            ("/generate_stream", {"inputs": p, "parameters": {"max_new_tokens": 6, "details": True}}),
            ("/v1/completions", {"model": "m", "prompt": p, "max_tokens": 6, "temperature": 0.8, "seed": 7}),
        ]
        for path, body in calls:
            status, raw = _post(server.url + path, body)
            if body.get("stream") or path.endswith("_stream"):
                events = [json.loads(ln[5:]) for ln in raw.decode().splitlines()
                          if ln.startswith("data:") and ln.strip() != "data: [DONE]"]
                out.append((path, status, _clean(events)))
            else:
                out.append((path, status, _clean(json.loads(raw))))
    return out


def test_native_serve_imports_no_transformers_and_answers_the_same(servers):
    native, old = servers["native"], servers["transformers"]
    got, want = _answers(native), _answers(old)
    assert len(got) == len(want) == 7 * len(PROMPTS)
    assert all(status == 200 for _, status, _ in got), [a for a in got if a[1] != 200][:2]
    for a, b in zip(got, want):
        assert a == b, (a, b)
    info = _info(native)
    assert (info["load_path"], info["tokenizer"], info["engine"]) == ("native", "native", "fast")
    assert info["transformers_imported"] is False          # after all those requests, in the server process
    old_info = _info(old)
    assert (old_info["load_path"], old_info["tokenizer"], old_info["transformers_imported"]) == (
        "direct", "transformers", True)
    for k in ("parameters", "weight_bytes", "dtype", "context_length", "max_input_bytes", "max_total_tokens"):
        assert info[k] == old_info[k], k
    log = native.log()
    assert "tokenizer: native (tokenizer.json, no transformers)" in log
    assert "load path: native (safetensors onto cpu, model built without transformers)" in log
    for p in PROMPTS:          # startup logs carry no prompt text
        assert p.strip()[:8] not in log
    assert "native model: no (MODEL_SERVER_NO_TRANSFORMERS=0)" in old.log()


def test_api_worker_loads_the_native_tokenizer(tiny_model_dir, servers):
    with start_model_server(tiny_model_dir, "--engine", "fast", "--max-batch", "8", "--api-workers", "1") as w:
        body = {"model": "m", "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0}
        got = _clean(json.loads(_post(w.url + "/v1/completions", body)[1]))
        want = _clean(json.loads(_post(servers["native"].url + "/v1/completions", body)[1]))
        assert got == want
        assert w.log().count("tokenizer: native (tokenizer.json, no transformers)") == 2   # engine + worker
