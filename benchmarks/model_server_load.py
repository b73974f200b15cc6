"""model_server_throughput.py's load: closed-loop streaming requests against the server's OpenAI API
(tokens/s, TTFT percentiles), the NVML energy counter around a level, and the baseline: plain
``model.generate`` one request at a time in this process.

Owns: those measurements. Must NOT: start servers or write result files.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from support import percentile


async def _one_request(session, url: str, prompt: list[int], new_tokens: int, model: str) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.monotonic()
    first = None
    usage = None
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("choices"):
                if first is None:
                    first = time.monotonic()
            elif data.get("usage"):
                usage = data["usage"]
    t1 = time.monotonic()
    if usage is None:
        raise RuntimeError("no usage chunk in the stream")
    return {"ttft_s": (first or t1) - t0, "duration_s": t1 - t0, "completion_tokens": usage["completion_tokens"]}


async def run_level(url: str, model: str, prompts: list[list[int]], concurrency: int, n_requests: int,
                    new_tokens: int) -> dict[str, Any]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=1800)
    results: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(n_requests):
            queue.put_nowait(prompts[i % len(prompts)])

        async def worker():
            while True:
                try:
                    p = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await _one_request(s, url, p, new_tokens, model))

        t0 = time.monotonic()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.monotonic() - t0
    tokens = sum(r["completion_tokens"] for r in results)
    ttfts = [r["ttft_s"] for r in results]
    return {"concurrency": concurrency, "requests": len(results), "completion_tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else None,
            "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p99_s": percentile(ttfts, 0.99)}


def _energy_mj(uuids: list[str]) -> dict[str, int] | None:
    from model_server.gpu import energy_millijoules

    return energy_millijoules(uuids)


def sequential_generate(model_dir: Path, quantization: str, device: str, prompts: list[list[int]],
                        new_tokens: int, n: int) -> dict[str, Any]:
    """Plain ``model.generate`` one prompt at a time, same quantization path as the server."""
    import torch

    from model_server.loading import load_model

    lm = load_model(str(model_dir), device, quantization)
    model = lm.model

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def gen(ids: list[int], max_new: int) -> int:
        x = torch.tensor([ids], device=model.device)
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                                 min_new_tokens=max_new, do_sample=False,
                                 pad_token_id=lm.tokenizer.pad_token_id)
        return int(out.shape[1] - x.shape[1])

    gen(prompts[0], 2)                                          # warm-up
    sync()
    ttfts = []
    for p in prompts[:n]:
        t0 = time.monotonic()
        gen(p, 1)
        sync()
        ttfts.append(time.monotonic() - t0)
    tokens = 0
    t0 = time.monotonic()
    for p in prompts[:n]:
        tokens += gen(p, new_tokens)
    sync()
    wall = time.monotonic() - t0
    result = {"requests": n, "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
              "ttft_p50_s": percentile(ttfts, 0.5), "weight_bytes": lm.weight_bytes}
    del model, lm
    if device == "cuda":
        torch.cuda.empty_cache()
    return result
