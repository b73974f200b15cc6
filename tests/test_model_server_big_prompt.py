"""One huge prompt does not freeze the model server (issue 19).

A prompt longer than ``max_input_bytes`` (from the model's max context, ``/info``) is refused
before any tokenizer work; tokenization runs off the event loop. Before this, a 10 MB prompt was
tokenized on the event loop (5 M tokens, ~20 s here) and ``/health`` did not answer meanwhile.
"""
from __future__ import annotations

import threading
import time

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(180)

BIG = "ab cd " * (10 * 1024 * 1024 // 6)          # 10 MB of text: ~5 M tokens with the tiny tokenizer
PROBE_BOUND_S = 2.0                               # a Kubernetes readiness probe's timeout


def _health_while(url: str, fire) -> tuple[object, float, list[float]]:
    """Run ``fire()`` in a thread; poll /health until it returns. -> (its result, its seconds, /health latencies)."""
    out: dict[str, object] = {}

    def run() -> None:
        t0 = time.monotonic()
        out["r"] = fire()
        out["s"] = time.monotonic() - t0

    th = threading.Thread(target=run)
    th.start()
    lat: list[float] = []
    while th.is_alive():
        t0 = time.monotonic()
        try:
            requests.get(url + "/health", timeout=60).raise_for_status()
        finally:
            lat.append(time.monotonic() - t0)
        time.sleep(0.05)
    th.join()
    return out["r"], float(out["s"]), lat


@pytest.mark.parametrize("path,body,param", [
    ("/generate", {"inputs": BIG, "parameters": {"max_new_tokens": 2}}, None),
    ("/v1/completions", {"prompt": BIG, "max_tokens": 2}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": BIG}], "max_tokens": 2}, "messages"),
    ("/v1/completions", {"prompt": [5] * 3_000_000, "max_tokens": 2}, "prompt"),
], ids=["tgi", "completions", "chat", "token-ids"])
def test_huge_prompt_is_refused_and_health_keeps_answering(model_server, path, body, param):
    info = requests.get(model_server.url + "/info", timeout=10).json()
    assert info["max_input_bytes"] and info["max_input_bytes"] < len(BIG) // 10
    r, seconds, lat = _health_while(model_server.url,
                                    lambda: requests.post(model_server.url + path, json=body, timeout=120))
    if param is None:
        assert r.status_code == 422 and r.json()["error_type"] == "validation", r.text
    else:
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" and err["param"] == param
    # generous bounds (the old code took ~20 s here and /health waited as long): a probe never times out
    assert max(lat) < PROBE_BOUND_S, lat
    assert seconds < 10, seconds


def test_truncate_keeps_the_tail_of_a_long_prompt(model_server):
    r = requests.post(model_server.url + "/generate", timeout=60, json={
        "inputs": "word " * 200_000, "parameters": {"max_new_tokens": 2, "truncate": 50, "details": True}})
    assert r.status_code == 200, r.text
    assert r.json()["details"]["input_length"] == 50


def test_prompt_at_the_token_limit_is_under_the_byte_bound(model_server):
    """The byte bound never refuses what the token check would accept: the longest vocabulary
    entries, max_input_tokens of them, are served."""
    from transformers import AutoTokenizer

    info = requests.get(model_server.url + "/info", timeout=10).json()
    tok = AutoTokenizer.from_pretrained(model_server.model_dir)
    vocab = {t: i for t, i in tok.get_vocab().items() if i not in set(tok.all_special_ids)}
    longest = max(vocab, key=lambda t: len(tok.decode([vocab[t]]).encode()))
    lo, hi = 1, info["max_input_tokens"]          # the most repeats that still fit the token limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tok(tok.decode([vocab[longest]] * mid))["input_ids"]) <= info["max_input_tokens"] - 1:
            lo = mid
        else:
            hi = mid - 1
    text = tok.decode([vocab[longest]] * lo)
    ids = tok(text)["input_ids"]
    assert len(ids) <= info["max_input_tokens"] - 1 and len(text.encode()) > 2 * len(ids)
    r = requests.post(model_server.url + "/v1/completions", json={"prompt": text, "max_tokens": 1}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(ids)


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=1, max_size=400))
def test_bound_premise_bytes_per_token(tiny_model_dir, text):
    """prompt_byte_bound's premise: no token covers more input bytes than its vocabulary string has."""
    from model_server.api_common import prompt_byte_bound

    tok = _tok(tiny_model_dir)
    per_token = prompt_byte_bound(tok, 1)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(text.encode("utf-8", "surrogatepass")) <= max(1, len(ids)) * per_token


_TOKS: dict[str, object] = {}


def _tok(path: str):
    if path not in _TOKS:
        from transformers import AutoTokenizer

        _TOKS[path] = AutoTokenizer.from_pretrained(path)
    return _TOKS[path]
