"""Test helpers for the proxy tests: a small real aiohttp upstream speaking the OpenAI and TGI
APIs (with fault knobs), runnable in-process or as a subprocess (``python -m tests.proxy_support
--port P``) so a test can kill it for real.

Fault knobs (request header ``x-fake-fault``, forwarded by the proxy like any end-to-end header):
``500`` (an OpenAI error body with status 500), ``slow`` (no headers for 30 s), ``drop`` (close the socket after two tokens), ``no-usage`` (ignore
stream_options.include_usage), ``slow-tokens`` (50 ms between tokens, 200 tokens), ``hold-first`` (headers, then nothing until
``state.release`` is set), ``slow-eof`` (20 ms between the last event and the end of the body, as a
backend finishing its bookkeeping: a client that closes after the terminator closes in between).

Also ``wait_until`` (an async poll) and ``metric_value`` (a sample sum from Prometheus text). The proxy under
test, in-process (``running_proxy``, ``RecordingObserver``), is in tests/running_proxy_support.py.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

MODEL = "fake-model"
FINGERPRINT = "fp_fake"   # system_fingerprint placed where vLLM places it (see the openai handler)
QUEUE_MS = 7.0            # vLLM --enable-per-request-metrics queue_time_ms on the usage chunk


def words_for(prompt: str, n: int) -> list[str]:
    """Deterministic 'generation': n pieces derived from the prompt."""
    base = [w for w in prompt.split() if w] or ["tok"]
    return [f" {base[i % len(base)]}{i}" for i in range(n)]


@dataclass
class UpstreamState:
    requests: list[dict[str, Any]] = field(default_factory=list)   # path, headers, body
    disconnects: int = 0
    finished_streams: int = 0
    release: asyncio.Event | None = None    # fault "hold-first": first event waits for this
    info_hits: int = 0                      # GET /info requests served
    info_status: int = 200                  # e.g. 404: a backend without /info (vLLM)


def _lax_bool(value: Any) -> bool:
    """A boolean field as vLLM's request models read it (pydantic lax mode: "yes", 1, "true" ...)."""
    from pydantic import TypeAdapter, ValidationError

    try:
        return bool(TypeAdapter(bool | None).validate_python(value))
    except ValidationError:
        return False


def _prompt_of(body: dict[str, Any]) -> str:
    if "messages" in body:
        return " ".join(str(m.get("content", "")) for m in body["messages"] if isinstance(m, dict))
    return str(body.get("prompt", body.get("inputs", "")))


def make_app(state: UpstreamState | None = None) -> web.Application:
    state = state or UpstreamState()
    app = web.Application(client_max_size=64 * 1024 * 1024)   # pass-through uploads in tests
    prompt_tokens: dict[int, str] = {}

    def record(request: web.Request, body: Any) -> str:
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        state.requests.append({"path": request.path, "headers": dict(request.headers), "body": body,
                               "peer": tuple(peer) if peer else None})
        return request.headers.get("x-fake-fault", "")

    async def sse_stream(request: web.Request, fault: str, events: list[bytes], gap: float,
                         first_gap: float = 0.0) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "x-prompt-tokens": prompt_tokens.pop(id(request), "0")})
        await resp.prepare(request)
        if fault == "hold-first":
            await resp.write(b"")          # headers out now
            assert state.release is not None
            await state.release.wait()
        try:
            for i, ev in enumerate(events):
                if fault == "drop" and i == 3:
                    assert request.transport is not None
                    request.transport.close()       # the socket closes mid-stream
                    return resp
                await resp.write(ev)
                if i == 0 and first_gap:
                    await asyncio.sleep(first_gap)
                elif gap:
                    await asyncio.sleep(gap)
            if fault == "slow-eof":
                await asyncio.sleep(0.02)
            await resp.write_eof()
            state.finished_streams += 1
        except (ConnectionResetError, asyncio.CancelledError):
            state.disconnects += 1
            raise
        return resp

    async def openai(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        fault = record(request, body)
        if fault == "500":
            return web.json_response({"error": {"message": "engine failed", "type": "server_error",
                                                "param": None, "code": None}}, status=500)
        if fault == "slow":
            await asyncio.sleep(30)
        chat = request.path.endswith("chat/completions")
        prompt = _prompt_of(body)
        n_prompt = len(prompt.split())
        prompt_tokens[id(request)] = str(n_prompt)
        n = int(body.get("max_tokens") or 8)
        if fault == "slow-tokens":
            n = 200
        pieces = words_for(prompt, n)
        oid = "cmpl-fake"
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}
        obj = "chat.completion" if chat else "text_completion"
        if not _lax_bool(body.get("stream")):
            text = "".join(pieces)
            choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": text},
                                       "finish_reason": "length"} if chat else
                                      {"index": 0, "text": text, "finish_reason": "length"})
            return web.json_response({"id": oid, "object": obj, "created": 1, "model": MODEL,
                                      "choices": [choice], "usage": usage},
                                     headers={"x-prompt-tokens": str(n_prompt)})
        include_usage = _lax_bool((body.get("stream_options") or {}).get("include_usage")) and fault != "no-usage"
        extra = {"usage": None} if include_usage else {}

        def chunk(delta_or_text: Any, finish: str | None = None) -> bytes:
            if chat:
                ch = {"index": 0, "delta": delta_or_text, "finish_reason": finish}
            else:
                ch = {"index": 0, "text": delta_or_text, "finish_reason": finish}
            o = {"id": oid, "object": obj + ".chunk" if chat else obj, "created": 1, "model": MODEL,
                 "choices": [ch], **extra}
            if finish and not include_usage:
                o["system_fingerprint"] = FINGERPRINT     # vLLM: on terminal chunks without usage
            return b"data: " + json.dumps(o).encode() + b"\n\n"

        events: list[bytes] = []
        if chat:
            events.append(chunk({"role": "assistant", "content": ""}))
        events += [chunk({"content": p} if chat else p) for p in pieces]
        events.append(chunk({} if chat else "", "length"))
        if include_usage:
            # vLLM: the fingerprint and the per-request metrics ride on the usage chunk
            events.append(b"data: " + json.dumps({"id": oid, "object": obj, "created": 1, "model": MODEL,
                                                  "choices": [], "usage": usage,
                                                  "system_fingerprint": FINGERPRINT,
                                                  "metrics": {"queue_time_ms": QUEUE_MS}}).encode() + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        gap = 0.05 if fault == "slow-tokens" else 0.0
        return await sse_stream(request, fault, events, gap, first_gap=0.02 if chat else 0.0)

    async def tgi(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        fault = record(request, body)
        if fault == "slow":
            await asyncio.sleep(30)
        params = body.get("parameters") or {}
        prompt = str(body.get("inputs", ""))
        n_prompt = len(prompt.split())
        prompt_tokens[id(request)] = str(n_prompt)
        n = int(params.get("max_new_tokens") or 8)
        if fault == "slow-tokens":
            n = 200
        pieces = words_for(prompt, n)
        stream = request.path == "/generate_stream" or (request.path == "/" and body.get("stream"))
        if not stream:
            details: dict[str, Any] = {"finish_reason": "length", "generated_tokens": n, "seed": None,
                                       "prefill": [], "tokens": [
                                           {"id": i, "text": p, "logprob": -1.0, "special": False}
                                           for i, p in enumerate(pieces)]}
            if params.get("decoder_input_details"):
                details["prefill"] = [{"id": i, "text": w, "logprob": None} for i, w in enumerate(prompt.split())]
            out: Any = {"generated_text": "".join(pieces), "details": details}
            if request.path == "/":
                out = [out]
            return web.json_response(out, headers={"x-prompt-tokens": str(n_prompt),
                                                   "x-generated-tokens": str(n), "x-queue-time": "3"})
        events = []
        for i, p in enumerate(pieces):
            last = i == n - 1
            ev = {"index": i, "token": {"id": i, "text": p, "logprob": -1.0, "special": False},
                  "generated_text": "".join(pieces) if last else None,
                  "details": {"finish_reason": "length", "generated_tokens": n, "seed": None} if last else None,
                  "top_tokens": None}
            events.append(b"data:" + json.dumps(ev).encode() + b"\n\n")
        gap = 0.05 if fault == "slow-tokens" else 0.0
        return await sse_stream(request, fault, events, gap)

    async def info(request: web.Request) -> web.Response:
        state.info_hits += 1
        if state.info_status != 200:
            return web.json_response({"error": "no /info here"}, status=state.info_status)
        return web.json_response({"model_id": MODEL, "model_dtype": "float32", "model_device_type": "cpu",
                                  "max_concurrent_requests": 8, "max_input_tokens": 512,
                                  "max_total_tokens": 1024, "version": "fake"})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="")

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        record(request, body.decode("utf-8", "replace"))
        return web.Response(body=body, headers={"x-echo-path": request.path_qs, "Content-Type": "application/octet-stream"})

    app.router.add_post("/v1/chat/completions", openai)
    app.router.add_post("/v1/completions", openai)
    app.router.add_post("/generate", tgi)
    app.router.add_post("/generate_stream", tgi)
    app.router.add_post("/", tgi)
    app.router.add_get("/info", info)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    async def ws_echo(request: web.Request) -> web.WebSocketResponse:
        """WebSocket echo; "close-me" makes it close with code 4001; records headers."""
        record(request, "")
        ws = web.WebSocketResponse(protocols=("b",))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == web.WSMsgType.TEXT:
                if msg.data == "close-me":
                    await ws.close(code=4001, message=b"asked")
                    break
                await ws.send_str("echo:" + msg.data)
            elif msg.type == web.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    app.router.add_route("*", "/echo/{tail:.*}", echo)
    app.router.add_get("/ws", ws_echo)
    return app


class InProcessUpstream:
    def __init__(self) -> None:
        self.state = UpstreamState()
        self.app = make_app(self.state)
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> "InProcessUpstream":
        self.runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def wait_until(pred: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.01)
    return bool(pred())


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0.0 if none)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description="fake OpenAI/TGI upstream for proxy tests")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    web.run_app(make_app(), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
