"""OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

Owns the responses: a completion object, the SSE chunk stream, the model objects and the error
shape. Reading a request (prompt, messages, sampling fields) is :mod:`model_server.api_openai_request`'s;
this module must not interpret request fields itself.

Errors: ``{"error": {"message", "type", "param", "code"}}`` with 400 (validation), 404 (unknown
model), 429/503 (overloaded / not ready). ``usage`` is exact (prompt tokens as tokenized here,
completion tokens as generated, EOS included). ``temperature`` absent: the model's
generation_config decides greedy vs sampling; ``temperature: 0`` is greedy.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from aiohttp import web

from model_server.api_common import (PROMPT_TOKENS_HEADER, check_lengths, dumps, read_json_object,
                                     run_tokenizer, sse_headers)
from model_server.api_openai_request import (check_model, fit_default_max, prompt_ids_chat,
                                             prompt_ids_completions, sampling_params)
from model_server.engines.base import SamplingParams
from model_server.generation import ApiError, Outcome, new_request_id, run_generation

API = "openai"
# what json.dumps(str, ensure_ascii=False) uses for a string (C-accelerated where available)
_encode_str = getattr(json.encoder, "c_encode_basestring", None) or json.encoder.py_encode_basestring
_TYPES = {"validation": "invalid_request_error", "not_found": "invalid_request_error",
          "overloaded": "rate_limit_error", "unavailable": "service_unavailable", "generation": "server_error"}


def error_response(err: ApiError) -> web.Response:
    status = 400 if err.status == 422 else err.status
    code = err.code
    if code is None and err.kind == "not_found":
        code = "model_not_found"
    return web.json_response({"error": {"message": err.message, "type": _TYPES.get(err.kind, "invalid_request_error"),
                                        "param": err.param, "code": code}}, status=status)


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


async def handle(request: web.Request, runtime, chat: bool) -> web.StreamResponse:
    arrival = time.monotonic_ns()
    try:
        body = await read_json_object(request)
        check_model(runtime, body)
        runtime.check_ready()
        if chat:
            prompt_ids = await run_tokenizer(runtime, prompt_ids_chat, runtime, body)
            sp, stops, opts = sampling_params(runtime, body, max_key="max_completion_tokens", default_max=1 << 30)
        else:
            prompt_ids = await run_tokenizer(runtime, prompt_ids_completions, runtime, body)
            sp, stops, opts = sampling_params(runtime, body, max_key="max_tokens", default_max=16)
        sp = fit_default_max(runtime, sp, len(prompt_ids), opts["max_given"])
        check_lengths(runtime, len(prompt_ids), sp.max_new_tokens,
                      new_param=opts["max_key"],
                      prompt_param="messages" if chat else "prompt")
    except ApiError as err:
        runtime.metrics.requests.labels(API, "rejected" if err.status in (429, 503) else "invalid").inc()
        return error_response(err)
    rid = new_request_id("chatcmpl" if chat else "cmpl")
    created = int(time.time())
    if opts["stream"]:
        return await _stream(request, runtime, chat, rid, created, prompt_ids, sp, stops, opts, arrival)
    outcome = Outcome(prompt_tokens=len(prompt_ids))
    failure = None
    gen = run_generation(runtime, API, prompt_ids, sp, stops, outcome, arrival)
    async with contextlib.aclosing(gen):
        async for step in gen:
            if step.finish_reason in ("error", "cancelled"):
                failure = step
    headers = {PROMPT_TOKENS_HEADER: str(len(prompt_ids))}
    if failure is not None:
        err = ApiError(500 if failure.finish_reason == "error" else 503,
                       failure.error or "generation was cancelled", kind="generation")
        resp = error_response(err)
        resp.headers.update(headers)
        return resp
    usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": outcome.generated_tokens,
             "total_tokens": len(prompt_ids) + outcome.generated_tokens}
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": outcome.text},
                  "logprobs": None, "finish_reason": _finish(outcome.finish_reason)}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": outcome.text, "logprobs": None,
                  "finish_reason": _finish(outcome.finish_reason)}
        obj = "text_completion"
    return web.json_response({"id": rid, "object": obj, "created": created, "model": runtime.served_name,
                              "system_fingerprint": None, "choices": [choice], "usage": usage},
                             headers=headers)


async def _stream(request, runtime, chat: bool, rid: str, created: int, prompt_ids: list[int],
                  sp: SamplingParams, stops: list[str], opts: dict[str, Any], arrival: int) -> web.StreamResponse:
    resp = web.StreamResponse(headers=sse_headers(len(prompt_ids)))
    outcome = Outcome(prompt_tokens=len(prompt_ids))
    obj = "chat.completion.chunk" if chat else "text_completion"
    include_usage = opts["include_usage"]

    # the constant parts of every chunk are encoded once; per token only ``choices`` is (same bytes as
    # dumping the whole object: keys in the same order, same separators)
    head = dumps({"id": rid, "object": obj, "created": created, "model": runtime.served_name,
                  "system_fingerprint": None})
    prefix = f"data: {head[:-1]},\"choices\":"
    null_tail = (',"usage":null}\n\n' if include_usage else "}\n\n").encode()
    token_tpl = ('[{"index":0,"delta":{"content":%s},"logprobs":null,"finish_reason":null}]' if chat else
                 '[{"index":0,"text":%s,"logprobs":null,"finish_reason":null}]')

    def chunk(choices: list[dict[str, Any]], usage: Any = None) -> bytes:
        if usage is None:
            return (prefix + dumps(choices)).encode() + null_tail
        return f"{prefix}{dumps(choices)},\"usage\":{dumps(usage)}}}\n\n".encode()

    gen = run_generation(runtime, API, prompt_ids, sp, stops, outcome, arrival)
    async with contextlib.aclosing(gen):
        await resp.prepare(request)
        # chunks of tokens that were already waiting are joined into one write (one send), so a
        # loop that falls behind catches up with fewer writes instead of one per token
        buf: list[bytes] = []
        if chat:
            await resp.write(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]))
        async for step in gen:
            if step.finish_reason in ("error", "cancelled"):
                err = {"error": {"message": step.error or "generation was cancelled", "type": "server_error",
                                 "param": None, "code": None}}
                buf.append(f"data: {dumps(err)}\n\n".encode())
                break
            finish = _finish(step.finish_reason) if step.finish_reason else None
            if finish is None:      # the common case, byte-identical to dumping the choice object
                buf.append((prefix + token_tpl % _encode_str(step.text)).encode() + null_tail)
            elif chat:
                delta = {"content": step.text} if (step.text or finish is None) else {}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": step.text, "logprobs": None, "finish_reason": finish}
            if finish is not None:
                buf.append(chunk([choice]))
                if include_usage:
                    buf.append(chunk([], {"prompt_tokens": len(prompt_ids),
                                          "completion_tokens": outcome.generated_tokens,
                                          "total_tokens": len(prompt_ids) + outcome.generated_tokens}))
                buf.append(b"data: [DONE]\n\n")
            if not step.more or finish is not None:
                await resp.write(b"".join(buf))
                buf.clear()
        if buf:
            await resp.write(b"".join(buf))
    with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
        await resp.write_eof()
    return resp


def _model_object(runtime) -> dict[str, Any]:
    return {"id": runtime.served_name, "object": "model", "created": int(runtime.startup.get("process_start") or 0),
            "owned_by": "edge-eval", "max_model_len": runtime.limits.max_total_tokens}


async def model(request: web.Request, runtime) -> web.Response:
    """GET /v1/models/{id}: the served model under any of its names (openai's models.retrieve)."""
    name = request.match_info["model_id"]
    if name not in runtime.names():
        return error_response(ApiError(404, f"The model `{name}` does not exist. This server serves "
                                            f"`{runtime.served_name}`.", kind="not_found", param="model"))
    return web.json_response(_model_object(runtime))


async def models(_request: web.Request, runtime) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_object(runtime)]})
