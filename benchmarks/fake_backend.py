"""The fake fast OpenAI backend and the edge-proxy targets that the proxy benchmarks put in front of it
(proxy_overhead.py, energy_load.py, proxy_diagnostics.py).

Owns: the upstream (aiohttp, its own process: ``SCRIPT --upstream PORT --tokens N --first-token-ms F
--token-interval-ms I``), which streams ``tokens`` SSE events on a fixed schedule from the request's
arrival and the usage chunk last (``stamp``: with the upstream's own times per request, transit.py's
format), and starting ``edge-proxy serve`` subprocesses against it.

Must NOT: measure or report anything (the benchmarks do), or listen anywhere but 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from support import ROOT, free_port, wait_http_ok
from transit import STAMP_HEADER, stamp_comment, stamp_header


def run_upstream(port: int, tokens: int, first_ms: float, interval_ms: float, *,
                 prompt_header: bool = True, backlog: int = 1024, stamp: bool = False) -> None:
    """Serve the fake backend until killed. Streaming: SSE on a fixed schedule, first event after
    ``first_ms``, then one every ``interval_ms`` (ms); non-streaming: one JSON body after the same
    total time. ``prompt_header``: also send ``x-prompt-tokens: 8`` (without it, the prompt-token
    count is known only from the usage chunk at the end, like vLLM: the energy ledger's hardest case).
    ``stamp``: tell the client this process's own times per request (CLOCK_MONOTONIC ns: handler
    entry, first data write, last write), as transit.py's SSE comment before ``data: [DONE]`` or
    its ``x-upstream-ns`` header on a whole response."""
    from aiohttp import web

    piece = lambda i: (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"bench",'  # noqa: E731
                       b'"choices":[{"index":0,"delta":{"content":" tok%d"},"finish_reason":null}]}\n\n' % i)
    events = [piece(i) for i in range(tokens)]
    final = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"bench",'
             b'"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\n\n')
    usage = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"bench","choices":[],'
             b'"usage":{"prompt_tokens":8,"completion_tokens":%d,"total_tokens":%d}}\n\n' % (tokens, tokens + 8))
    body = json.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": "bench",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * tokens},
                                    "finish_reason": "length"}],
                       "usage": {"prompt_tokens": 8, "completion_tokens": tokens,
                                 "total_tokens": tokens + 8}}).encode()
    headers = {"Content-Type": "text/event-stream", **({"x-prompt-tokens": "8"} if prompt_header else {})}

    async def chat(request: web.Request) -> web.StreamResponse:
        recv = time.monotonic_ns()
        req = await request.json()
        if not req.get("stream"):
            await asyncio.sleep((first_ms + interval_ms * (tokens - 1)) / 1000)
            extra = {STAMP_HEADER: stamp_header(recv, time.monotonic_ns())} if stamp else None
            return web.Response(body=body, content_type="application/json", headers=extra)
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        # Events on a fixed schedule from the request's arrival (like a GPU's decode steps), not
        # "sleep after each write": a late wake-up of this process (CPU shared with the proxy under
        # test) must not push every later event back and show up as latency the proxy added.
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        first = 0
        for i, ev in enumerate(events):
            delay = t0 + (first_ms + interval_ms * i) / 1000 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if not i:
                first = time.monotonic_ns()
            await resp.write(ev)
        await resp.write(final)
        if (req.get("stream_options") or {}).get("include_usage"):
            await resp.write(usage)
        if stamp:
            await resp.write(stamp_comment(recv, first or time.monotonic_ns(), time.monotonic_ns()))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "bench", "object": "model"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", lambda r: web.Response(text="ok"))
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, backlog=backlog)


def start_upstream(script: str | Path, tokens: int, first_ms: float, interval_ms: float,
                   procs: list[subprocess.Popen]) -> tuple[subprocess.Popen, int]:
    """Run ``script --upstream PORT ...`` (a benchmark whose hidden ``--upstream`` flag calls
    :func:`run_upstream`) on a free port; returns the process (appended to ``procs``) and its port,
    once /health answers."""
    port = free_port()
    up = subprocess.Popen([sys.executable, str(script), "--upstream", str(port), "--tokens", str(tokens),
                           "--first-token-ms", str(first_ms), "--token-interval-ms", str(interval_ms)])
    procs.append(up)
    wait_http_ok(f"http://127.0.0.1:{port}/health", proc=up, name="upstream")
    return up, port


def start_edge_proxy(up_port: int, access_log: Path, extra: list[str], procs: list[subprocess.Popen],
                     metrics_port: int | None = None) -> tuple[subprocess.Popen, int]:
    """``edge-proxy serve`` in front of 127.0.0.1:``up_port`` (metrics server off unless
    ``metrics_port``); returns the process (appended to ``procs``) and its port, once /health answers."""
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "edge_proxy", "serve", "--backend", f"http://127.0.0.1:{up_port}",
                          "--port", str(port), "--metrics-port", str(metrics_port) if metrics_port else "none",
                          "--access-log", str(access_log), *extra],
                         cwd=ROOT, stderr=subprocess.DEVNULL)
    procs.append(p)
    wait_http_ok(f"http://127.0.0.1:{port}/health", proc=p, name="edge-proxy")
    return p, port
