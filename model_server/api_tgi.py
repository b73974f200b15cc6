"""TGI-compatible routes: ``POST /generate``, ``POST /generate_stream``, ``POST /`` (text_generation client).

Errors: ``{"error": message, "error_type": validation|overloaded|generation|incomplete_generation}``.
Validation errors are 422 (malformed JSON 400), not-ready 503, too many requests 429.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from aiohttp import web

from model_server.api_common import (PROMPT_TOKENS_HEADER, check_lengths, check_prompt_ids, dumps,
                                     read_json_object, run_tokenizer, sse_headers, tokenize_prompt)
from model_server.compat import check_seed, seed_used
from model_server.engines.base import SamplingParams
from model_server.generation import ApiError, Outcome, Step, run_generation
from model_server.params import get_bool, get_float, get_int, get_stops

API = "tgi"
_ERROR_TYPES = {"validation": "validation", "overloaded": "overloaded", "unavailable": "overloaded",
                "not_found": "validation", "generation": "generation"}


def error_response(err: ApiError) -> web.Response:
    return web.json_response({"error": err.message, "error_type": _ERROR_TYPES.get(err.kind, "validation")},
                             status=err.status)


def _unsupported(params: dict[str, Any], key: str, allowed: tuple[Any, ...]) -> None:
    if key in params and params[key] not in allowed:
        raise ApiError(422, f"`{key}` = {params[key]!r} is not supported by this server", param=key)


def parse_request(runtime, body: dict[str, Any]) -> tuple[list[int], SamplingParams, list[str], dict[str, Any]]:
    inputs = body.get("inputs")
    if inputs is None:
        raise ApiError(422, "missing field `inputs`", param="inputs")
    if not isinstance(inputs, str):
        raise ApiError(422, "`inputs` must be a string", param="inputs")
    if not inputs.strip():
        raise ApiError(422, "`inputs` cannot be empty", param="inputs")
    params = body.get("parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ApiError(422, "`parameters` must be an object", param="parameters")

    max_new = get_int(params, "max_new_tokens", default=runtime.limits.max_new_tokens_default, lo=1)
    temperature = get_float(params, "temperature", default=None, lo=0.0, lo_open=True)
    top_p = get_float(params, "top_p", default=None, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    top_k = get_int(params, "top_k", default=None, lo=1)
    seed = get_int(params, "seed", default=None, lo=0, hi=2**63 - 1)
    do_sample = get_bool(params, "do_sample", default=False)
    ignore_eos = get_bool(params, "ignore_eos", default=False)
    truncate = get_int(params, "truncate", default=None, lo=1)
    rep = get_float(params, "repetition_penalty", default=None, lo=0.0, lo_open=True)
    if rep is not None and rep != 1.0:
        raise ApiError(422, "`repetition_penalty` other than 1.0 is not supported by this server",
                       param="repetition_penalty")
    get_float(params, "typical_p", default=None, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    _unsupported(params, "typical_p", (None,))
    best_of = get_int(params, "best_of", default=None, lo=1)
    if best_of not in (None, 1):
        raise ApiError(422, "`best_of` > 1 is not supported by this server", param="best_of")
    _unsupported(params, "frequency_penalty", (None, 0, 0.0))
    _unsupported(params, "watermark", (None, False))
    _unsupported(params, "top_n_tokens", (None, 0))
    _unsupported(params, "grammar", (None,))
    _unsupported(params, "adapter_id", (None,))
    stops = get_stops(params, "stop")
    opts = {
        "details": get_bool(params, "details", default=False),
        "decoder_input_details": get_bool(params, "decoder_input_details", default=False),
        "return_full_text": get_bool(params, "return_full_text", default=False),
        "seed": seed,
        "inputs": inputs,
    }
    sampling = bool(do_sample or (temperature is not None and temperature != 1.0) or top_k is not None
                    or (top_p is not None and top_p < 1.0))
    prompt_ids = tokenize_prompt(runtime, inputs, param="inputs", keep_tail=truncate is not None)
    if truncate is not None and len(prompt_ids) > truncate:
        prompt_ids = prompt_ids[-truncate:]
    check_prompt_ids(runtime, prompt_ids, "inputs")
    check_lengths(runtime, len(prompt_ids), max_new, new_param="max_new_tokens", prompt_param="inputs")
    sp = SamplingParams(max_new_tokens=max_new, do_sample=sampling,
                        temperature=temperature if temperature is not None else 1.0,
                        top_p=top_p if top_p is not None else 1.0, top_k=top_k or 0, seed=seed,
                        ignore_eos=ignore_eos)
    check_seed(runtime.engine, sp, "seed", status=422)
    opts["seed"] = seed_used(runtime.engine, sp)      # details.seed: only a seed that was used
    return prompt_ids, sp, stops, opts


def _token(step: Step) -> dict[str, Any]:
    return {"id": step.token_id, "text": step.text, "logprob": step.logprob, "special": step.special}


def _finish(reason: str | None) -> str:
    return reason if reason in ("length", "eos_token", "stop_sequence") else "length"


def _prefill(runtime, prompt_ids: list[int], wanted: bool) -> list[dict[str, Any]]:
    if not wanted:
        return []
    tok = runtime.loaded.tokenizer
    return [{"id": t, "text": tok.decode([t], skip_special_tokens=False), "logprob": None} for t in prompt_ids]


async def _admit(request: web.Request, runtime) -> tuple[Any, ...]:
    body = await read_json_object(request)
    runtime.check_ready()
    return (body, *await run_tokenizer(runtime, parse_request, runtime, body))


async def handle(request: web.Request, runtime, mode: str) -> web.StreamResponse:
    """mode: "generate" (object), "stream" (SSE), or "root" (POST /: list, or SSE when stream=true)."""
    arrival = time.monotonic_ns()
    try:
        body, prompt_ids, sp, stops, opts = await _admit(request, runtime)
    except ApiError as err:
        runtime.metrics.requests.labels(API, "rejected" if err.status in (429, 503) else "invalid").inc()
        return error_response(err)
    stream = mode == "stream" or (mode == "root" and body.get("stream") is True)
    if stream:
        return await _stream(request, runtime, prompt_ids, sp, stops, opts, arrival)
    outcome = Outcome(prompt_tokens=len(prompt_ids))
    tokens: list[dict[str, Any]] = []
    failure: Step | None = None
    gen = run_generation(runtime, API, prompt_ids, sp, stops, outcome, arrival)
    async with contextlib.aclosing(gen):
        async for step in gen:
            if step.token_id is not None:
                tokens.append(_token(step))
            if step.finish_reason in ("error", "cancelled"):
                failure = step
    if failure is not None:
        status, etype = (500, "generation") if failure.finish_reason == "error" else (503, "incomplete_generation")
        return web.json_response({"error": failure.error or "generation was cancelled", "error_type": etype},
                                 status=status, headers={PROMPT_TOKENS_HEADER: str(len(prompt_ids))})
    text = (opts["inputs"] + outcome.text) if opts["return_full_text"] else outcome.text
    result: dict[str, Any] = {"generated_text": text}
    if opts["details"] or mode == "root":
        result["details"] = {
            "finish_reason": _finish(outcome.finish_reason), "generated_tokens": outcome.generated_tokens,
            "seed": opts["seed"], "input_length": len(prompt_ids),
            "prefill": _prefill(runtime, prompt_ids, opts["decoder_input_details"]),
            "tokens": tokens, "top_tokens": None, "best_of_sequences": None}
    payload: Any = [result] if mode == "root" else result
    return web.json_response(payload, headers={PROMPT_TOKENS_HEADER: str(len(prompt_ids))})


async def _stream(request: web.Request, runtime, prompt_ids: list[int], sp: SamplingParams, stops: list[str],
                  opts: dict[str, Any], arrival: int) -> web.StreamResponse:
    resp = web.StreamResponse(headers=sse_headers(len(prompt_ids)))
    outcome = Outcome(prompt_tokens=len(prompt_ids))
    gen = run_generation(runtime, API, prompt_ids, sp, stops, outcome, arrival)
    async with contextlib.aclosing(gen):
        await resp.prepare(request)
        index = 0
        buf: list[bytes] = []       # events of tokens already waiting go out in one write
        async for step in gen:
            if step.finish_reason in ("error", "cancelled"):
                etype = "generation" if step.finish_reason == "error" else "incomplete_generation"
                buf.append(f"data:{dumps({'error': step.error or 'generation was cancelled', 'error_type': etype})}\n\n".encode())
                break
            index += 1
            event: dict[str, Any] = {"index": index, "token": _token(step) if step.token_id is not None else
                                     {"id": 0, "text": step.text, "logprob": None, "special": True},
                                     "generated_text": None, "details": None, "top_tokens": None}
            if step.finish_reason is not None:
                text = (opts["inputs"] + outcome.text) if opts["return_full_text"] else outcome.text
                event["generated_text"] = text
                event["details"] = {"finish_reason": _finish(step.finish_reason),
                                    "generated_tokens": outcome.generated_tokens, "seed": opts["seed"],
                                    "input_length": len(prompt_ids)}
            buf.append(f"data:{dumps(event)}\n\n".encode())
            if not step.more or step.finish_reason is not None:
                await resp.write(b"".join(buf))
                buf.clear()
        if buf:
            await resp.write(b"".join(buf))
    with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
        await resp.write_eof()
    return resp
