"""Concurrent greedy requests are batched (their token streams interleave: they share decode steps)
and give exactly what sequential ``model.generate`` gives."""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.timeout(180)

PROMPTS = [
    "import os",
    "def add(a, b):\n    return a + b\n",
    "class Config:\n    \"\"\"Settings.\"\"\"\n    name: str = 'x'\n    size: int = 3\n",
    "for i in range(10):\n    print(i)",
    "# Licensed under the Apache License, Version 2.0 (the \"License\");\n# you may not use this file",
    "x",
    "async def fetch(session, url):\n    async with session.get(url) as r:\n        return await r.text()",
    "raise ValueError(",
]
NEW_TOKENS = 16


def test_eight_concurrent_greedy_equal_sequential_generate(model_server, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    async def concurrent():
        async with aiohttp.ClientSession() as s:
            async def one(prompt):
                async with s.post(model_server.url + "/generate", json={
                        "inputs": prompt, "parameters": {"max_new_tokens": NEW_TOKENS, "details": True}}) as r:
                    assert r.status == 200, await r.text()
                    body = await r.json()
                    return [t["id"] for t in body["details"]["tokens"]], body["generated_text"]
            return await asyncio.gather(*[one(p) for p in PROMPTS])

    served = asyncio.run(concurrent())

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for prompt, (ids, text) in zip(PROMPTS, served):
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False)
        expected = out[0, enc["input_ids"].shape[1]:].tolist()
        assert ids == expected, prompt
        assert text == tok.decode(expected, skip_special_tokens=True)
    # the outputs are not all one repeated token (otherwise equality would prove little)
    assert len({tuple(ids) for ids, _ in served}) > 4


def _batch_histogram(text: str) -> tuple[float, float]:
    """(observations, observations of 1) of model_server_batch_size."""
    count = ones = 0.0
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == "model_server_batch_size_count":
                count = smp.value
            elif smp.name == "model_server_batch_size_bucket" and smp.labels.get("le") == "1.0":
                ones = smp.value
    return count, ones


def test_concurrent_streams_share_decode_steps(model_server):
    """Eight concurrent streams: some request produces tokens while another is still producing its
    own (a one-at-a-time engine would finish each stream before the next one's first token), and
    the server's batch-size histogram records admissions into a non-empty engine."""

    async def run():
        async with aiohttp.ClientSession() as s:
            async with s.get(model_server.url + "/metrics") as r:
                before = _batch_histogram(await r.text())

            async def one(prompt):
                times = []
                async with s.post(model_server.url + "/generate_stream", json={
                        "inputs": prompt, "parameters": {"max_new_tokens": 32}}) as r:
                    assert r.status == 200, await r.text()
                    async for line in r.content:
                        if line.startswith(b"data:") and json.loads(line[5:]).get("token"):
                            times.append(time.monotonic())
                assert len(times) >= 2           # (a random-weight model may emit EOS early)
                return times[0], times[-1]
            spans = await asyncio.gather(*[one(p) for p in PROMPTS])
            async with s.get(model_server.url + "/metrics") as r:
                after = _batch_histogram(await r.text())
            return spans, before, after

    spans, before, after = asyncio.run(run())
    overlapping = sum(1 for i, (f1, l1) in enumerate(spans) for j, (f2, l2) in enumerate(spans)
                      if i < j and f1 < l2 and f2 < l1)
    assert overlapping >= 1, spans
    new, new_ones = after[0] - before[0], after[1] - before[1]
    assert new == len(PROMPTS) and new - new_ones >= 1, (before, after)
