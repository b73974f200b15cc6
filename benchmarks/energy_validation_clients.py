"""energy_validation.py's HTTP side: the streaming clients it measures with (OpenAI chat/completions
with per-token arrival times, TGI), the decode inter-token-latency block of check 5, and the counter
series (raw cumulative readings -> joules since the first, interpolated at any instant).

Owns: talking to the model server / proxy and turning counter readings into a series.
Must NOT: judge a check (the checks modules do), or start processes.
"""
from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import aiohttp


def http_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:   # noqa: S310 - 127.0.0.1 only
        return json.loads(r.read())


def cumulative_series(readings: list[Any], uuids: list[str]) -> list[tuple[int, float]]:
    """(t_ns, joules since the first reading) from raw counter readings, summed over GPUs;
    a counter that went down contributes 0 (as in the sampler)."""
    out: list[tuple[int, float]] = []
    prev: dict[str, int] = {}
    acc = 0.0
    for r in readings:
        if r.error is not None:
            continue
        for u in uuids:
            v = r.energy_mj.get(u)
            if v is None:
                continue
            if u in prev and v >= prev[u]:
                acc += (v - prev[u]) / 1000.0
            prev[u] = v
        out.append((r.t_ns, acc))
    return out


def interp(series: list[tuple[int, float]], t_ns: int) -> float | None:
    """Linear interpolation of the cumulative counter at t_ns (None outside the series)."""
    if not series or t_ns < series[0][0] or t_ns > series[-1][0]:
        return None
    lo, hi = 0, len(series) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if series[mid][0] <= t_ns:
            lo = mid
        else:
            hi = mid
    (t0, e0), (t1, e1) = series[lo], series[hi]
    return e0 if t1 == t0 else e0 + (e1 - e0) * (t_ns - t0) / (t1 - t0)


@dataclass
class StreamResult:
    rid: str
    token_times: list[int] = field(default_factory=list)
    t_start: int = 0
    t_end: int = 0
    status: int = 0


async def openai_stream(s: aiohttp.ClientSession, base: str, model: str, prompt: str, max_tokens: int,
                        rid: str, chat: bool = True) -> StreamResult:
    res = StreamResult(rid, t_start=time.monotonic_ns())
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
                            "temperature": 0, "stream_options": {"include_usage": True}}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    path = "/v1/chat/completions" if chat else "/v1/completions"
    async with s.post(base + path, json=body, headers={"x-request-id": rid}) as r:
        res.status = r.status
        buf = b""
        async for chunk in r.content.iter_any():
            buf += chunk
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                for line in ev.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        continue
                    try:
                        obj = json.loads(data)
                    except ValueError:
                        continue
                    for c in obj.get("choices") or []:
                        piece = (c.get("delta") or {}).get("content") if chat else c.get("text")
                        if piece:
                            res.token_times.append(time.monotonic_ns())
    res.t_end = time.monotonic_ns()
    return res


async def openai_once(s: aiohttp.ClientSession, base: str, model: str, prompt: str, max_tokens: int,
                      rid: str) -> int:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    async with s.post(base + "/v1/completions", json=body, headers={"x-request-id": rid}) as r:
        await r.read()
        return r.status


async def tgi_stream(s: aiohttp.ClientSession, base: str, prompt: str, max_tokens: int, rid: str) -> int:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_tokens, "ignore_eos": True}}
    async with s.post(base + "/generate_stream", json=body, headers={"x-request-id": rid}) as r:
        await r.read()
        return r.status


async def itl_block(base: str, model: str, streams: int, tokens: int, seconds: float, tag: str) -> list[float]:
    """Run `streams` concurrent streams repeatedly for `seconds`; inter-token gaps in seconds."""
    gaps: list[float] = []
    deadline = time.monotonic() + seconds
    n = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        while time.monotonic() < deadline:
            rs = await asyncio.gather(*(openai_stream(s, base, model, "measure the decode speed", tokens,
                                                      f"{tag}-{n}-{i}") for i in range(streams)))
            n += 1
            for r in rs:
                tt = r.token_times
                gaps += [(b - a) / 1e9 for a, b in zip(tt[1:], tt[2:])]   # after the first two tokens
    return gaps
