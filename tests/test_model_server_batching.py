"""Concurrent greedy requests are batched and give exactly what sequential ``model.generate`` gives."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest

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
