"""The demo's client load: the prompts, one request of each kind (streaming chat, OpenAI completion,
TGI generate) and the client-side statistics it records. Must not render anything (that is
:mod:`.table`) or start processes."""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

PROMPTS = [
    "Summarize the benefits of small language models for edge deployment.",
    "What is the capital of France?",
    "Explain energy per token in one sentence.",
    "Write a haiku about GPUs.",
    "List three ways to reduce inference cost. " * 3,
    "Translate 'good morning' into German.",
    "Why do cold starts matter for serverless inference? Give a short answer.",
    "Hello!",
]



@dataclass
class ClientStats:
    ok: int = 0
    errors: int = 0
    e2e: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    cold_start_seconds: float | None = None


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# ---------------------------------------------------------------------------------------- load
async def one_request(session: Any, base: str, model: str, kind: int, stats: ClientStats,
                      max_tokens: int) -> None:
    prompt = random.choice(PROMPTS)
    t0 = time.perf_counter()
    try:
        if kind == 0:       # streaming chat
            body = {"model": model, "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens, "stream": True,
                    "stream_options": {"include_usage": True}}
            first = last = None
            async with session.post(base + "/v1/chat/completions", json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(resp.status)
                async for raw in resp.content:
                    line = raw.decode(errors="replace").strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[5:])
                    if ev.get("usage"):
                        stats.output_tokens += int(ev["usage"].get("completion_tokens") or 0)
                    for ch in ev.get("choices") or []:
                        if (ch.get("delta") or {}).get("content"):
                            now = time.perf_counter()
                            if first is None:
                                first = now
                                stats.ttft.append(now - t0)
                            elif last is not None:
                                stats.itl.append(now - last)
                            last = now
        elif kind == 1:     # OpenAI completion
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens}
            async with session.post(base + "/v1/completions", json=body) as resp:
                data = await resp.json(content_type=None)
                if resp.status != 200:
                    raise RuntimeError(resp.status)
                stats.output_tokens += int((data.get("usage") or {}).get("completion_tokens") or 0)
        else:               # TGI generate
            body = {"inputs": prompt, "parameters": {"max_new_tokens": max_tokens,
                                                     "details": True}}
            async with session.post(base + "/generate", json=body) as resp:
                data = await resp.json(content_type=None)
                if resp.status != 200:
                    raise RuntimeError(resp.status)
                stats.output_tokens += int((data.get("details") or {}).get("generated_tokens") or 0)
        stats.e2e.append(time.perf_counter() - t0)
        stats.ok += 1
    except Exception:
        stats.errors += 1

