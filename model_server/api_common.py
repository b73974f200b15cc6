"""Helpers both APIs use: JSON bodies, tokenization with length checks, SSE writing."""
from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from model_server.generation import ApiError

PROMPT_TOKENS_HEADER = "x-prompt-tokens"
MAX_BODY_BYTES = 16 * 1024 * 1024


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or ApiError(400)."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, "request body too large") from None
    if not raw.strip():
        raise ApiError(400, "request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON body: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def tokenize_prompt(runtime, text: str, add_special_tokens: bool = True) -> list[int]:
    tok = runtime.loaded.tokenizer
    return list(tok(text, add_special_tokens=add_special_tokens)["input_ids"])


def check_prompt_ids(runtime, ids: list[int], param: str) -> None:
    """Token ids given directly must be ints inside the model's vocabulary."""
    vocab = int(getattr(runtime.loaded.model.config, "vocab_size", 0) or 0)
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab and t >= vocab):
            raise ApiError(422, f"`{param}` contains an invalid token id: {t!r}", param=param)


def check_lengths(runtime, n_prompt: int, max_new_tokens: int, *, new_param: str, prompt_param: str) -> None:
    """Prompt and prompt + completion must fit the served limits."""
    lim = runtime.limits
    if n_prompt == 0:
        raise ApiError(422, f"`{prompt_param}` must not be empty", param=prompt_param)
    if lim.max_input_tokens is not None and n_prompt > lim.max_input_tokens:
        raise ApiError(422, f"the prompt has {n_prompt} tokens; this model accepts at most "
                            f"{lim.max_input_tokens} input tokens", param=prompt_param,
                       code="context_length_exceeded")
    if lim.max_total_tokens is not None and n_prompt + max_new_tokens > lim.max_total_tokens:
        raise ApiError(422, f"prompt tokens ({n_prompt}) + {new_param} ({max_new_tokens}) must be <= "
                            f"{lim.max_total_tokens}", param=new_param, code="context_length_exceeded")


def sse_headers(n_prompt: int) -> dict[str, str]:
    return {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no", PROMPT_TOKENS_HEADER: str(n_prompt)}


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
