"""OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

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

from model_server.api_common import (PROMPT_TOKENS_HEADER, check_lengths, check_prompt_ids, dumps,
                                     read_json_object, run_tokenizer, sse_headers, tokenize_prompt)
from model_server.compat import check_openai_params, check_seed
from model_server.engines.base import SamplingParams
from model_server.generation import ApiError, Outcome, new_request_id, run_generation
from model_server.params import get_bool, get_float, get_int, get_stops

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


def _check_model(runtime, body: dict[str, Any]) -> None:
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise ApiError(400, "`model` must be a string", param="model")
    # One model is served: any name is accepted, as TGI does (huggingface_hub's InferenceClient
    # sends "dummy" or "tgi" to a URL); /info says so (docs/model_server.md, Compatibility).


def _sampling(runtime, body: dict[str, Any], *, max_key: str, default_max: int | None,
              n_prompt_hint: int | None = None) -> tuple[SamplingParams, list[str], dict[str, Any]]:
    max_tokens = get_int(body, max_key, default=None, lo=1)
    if max_key == "max_completion_tokens" and max_tokens is None:
        max_tokens = get_int(body, "max_tokens", default=None, lo=1)
        if max_tokens is not None:
            max_key = "max_tokens"
    temperature = get_float(body, "temperature", default=None, lo=0.0, hi=2.0)
    top_p = get_float(body, "top_p", default=None, lo=0.0, hi=1.0, lo_open=True)
    top_k = get_int(body, "top_k", default=None, lo=-1)
    seed = get_int(body, "seed", default=None, lo=-(2**63), hi=2**63 - 1)
    n = get_int(body, "n", default=1, lo=1, hi=128)
    if n != 1:
        raise ApiError(400, "`n` > 1 is not supported by this server", param="n")
    for key in ("presence_penalty", "frequency_penalty"):
        v = get_float(body, key, default=0.0, lo=-2.0, hi=2.0)
        if v != 0.0:
            raise ApiError(400, f"`{key}` other than 0 is not supported by this server", param=key)
    best_of = get_int(body, "best_of", default=None, lo=1)
    if best_of not in (None, 1):
        raise ApiError(400, "`best_of` > 1 is not supported by this server", param="best_of")
    if body.get("logprobs") not in (None, False, 0):
        raise ApiError(400, "`logprobs` is not supported by this server", param="logprobs")
    if body.get("echo") not in (None, False):
        raise ApiError(400, "`echo` is not supported by this server", param="echo")
    stream = get_bool(body, "stream", default=False)
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise ApiError(400, "`stream_options` must be an object", param="stream_options")
    include_usage = get_bool(so or {}, "include_usage", default=False, name="stream_options.include_usage")
    if so is not None and not stream:
        raise ApiError(400, "`stream_options` is only allowed when `stream` is true", param="stream_options")
    stops = get_stops(body, "stop", max_items=4)
    ignore_eos = get_bool(body, "ignore_eos", default=False)
    gen_cfg = getattr(runtime.loaded.model, "generation_config", None)
    if temperature is None:
        do_sample = bool(getattr(gen_cfg, "do_sample", False))
        temperature = float(getattr(gen_cfg, "temperature", 1.0) or 1.0) if do_sample else 1.0
    else:
        do_sample = temperature > 0.0
    if not do_sample:
        temperature = 1.0
    sp = SamplingParams(max_new_tokens=max_tokens or default_max or 16, do_sample=do_sample,
                        temperature=temperature, top_p=top_p if top_p is not None else 1.0,
                        top_k=top_k if top_k and top_k > 0 else 0, seed=seed, ignore_eos=ignore_eos)
    check_openai_params(body)
    check_seed(runtime.engine, sp, "seed")
    return sp, stops, {"stream": stream, "include_usage": include_usage, "max_given": max_tokens is not None,
                       "max_key": max_key}


def _fit_default_max(runtime, sp: SamplingParams, n_prompt: int, given: bool) -> SamplingParams:
    """Without an explicit max, use what the context leaves (OpenAI semantics), capped by the default."""
    if given or runtime.limits.max_total_tokens is None:
        return sp
    room = max(1, runtime.limits.max_total_tokens - n_prompt)
    return SamplingParams(**{**sp.__dict__, "max_new_tokens": min(sp.max_new_tokens, room)})


def _prompt_ids_completions(runtime, body: dict[str, Any]) -> list[int]:
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "missing field `prompt`", param="prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "`prompt` must not be empty", param="prompt")
        return tokenize_prompt(runtime, prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        check_prompt_ids(runtime, prompt, "prompt")
        return list(prompt)
    if isinstance(prompt, list) and not prompt:
        raise ApiError(400, "`prompt` must not be empty", param="prompt")
    raise ApiError(400, "`prompt` must be a string, a list of token ids, or a one-element list of either "
                        "(batches of prompts are not supported)", param="prompt")


def _content_text(content: Any, idx: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{idx}].content: only text parts are supported",
                               param=f"messages[{idx}].content")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise ApiError(400, f"messages[{idx}].content must be a string or a list of text parts",
                   param=f"messages[{idx}].content")


def _prompt_ids_chat(runtime, body: dict[str, Any]) -> list[int]:
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "missing field `messages`", param="messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list", param="messages")
    conv = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(400, f"messages[{i}].role must be system, user, assistant or tool",
                           param=f"messages[{i}].role")
        conv.append({"role": "system" if role == "developer" else role, "content": _content_text(m.get("content"), i)})
    if not any(c["content"] for c in conv):
        raise ApiError(400, "`messages` contain no text", param="messages")
    tok = runtime.loaded.tokenizer
    if not getattr(tok, "chat_template", None):
        raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
    try:
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # template raised (e.g. role order rules)
        raise ApiError(400, f"chat template rejected the messages: {exc}", param="messages") from None
    return tokenize_prompt(runtime, text, add_special_tokens=False, param="messages")


async def handle(request: web.Request, runtime, chat: bool) -> web.StreamResponse:
    arrival = time.monotonic_ns()
    try:
        body = await read_json_object(request)
        _check_model(runtime, body)
        runtime.check_ready()
        if chat:
            prompt_ids = await run_tokenizer(runtime, _prompt_ids_chat, runtime, body)
            sp, stops, opts = _sampling(runtime, body, max_key="max_completion_tokens", default_max=1 << 30)
        else:
            prompt_ids = await run_tokenizer(runtime, _prompt_ids_completions, runtime, body)
            sp, stops, opts = _sampling(runtime, body, max_key="max_tokens", default_max=16)
        sp = _fit_default_max(runtime, sp, len(prompt_ids), opts["max_given"])
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
    return web.json_response({"object": "list", "data": [{
        "id": runtime.served_name, "object": "model", "created": int(runtime.startup.get("process_start") or 0),
        "owned_by": "edge-eval", "max_model_len": runtime.limits.max_total_tokens}]})
