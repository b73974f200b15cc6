"""Helpers both APIs use: JSON bodies, tokenization with length checks, SSE writing.

Prompt size is bounded twice: by UTF-8 bytes before any tokenizer work (:func:`prompt_byte_bound`,
cheap, refuses a multi-megabyte prompt at once) and by tokens afterwards (:func:`check_lengths`).
Tokenization runs in the runtime's tokenizer thread (:func:`run_tokenizer`), never on the event loop.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Callable, TypeVar

from aiohttp import web

from model_server.generation import ApiError

PROMPT_TOKENS_HEADER = "x-prompt-tokens"


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


# a normalizer outside this set may shrink text (NFKC maps a 3-byte fullwidth letter to 1 byte; a
# composition joins up to 3 characters into one): the byte bound then allows 4 bytes per token byte
_NON_SHRINKING_NORMALIZERS = {"NFC", "NFD", "Prepend", "Sequence"}
SHRINK_FACTOR = 4
_T = TypeVar("_T")


def _normalizer_may_shrink(spec: Any) -> bool:
    if spec is None:
        return False
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "Sequence":
        return any(_normalizer_may_shrink(n) for n in spec.get("normalizers") or [])
    if kind == "Replace":
        pattern = (spec.get("pattern") or {}).get("String")
        content = spec.get("content")
        return not (isinstance(pattern, str) and isinstance(content, str)
                    and len(content.encode()) >= len(pattern.encode()))
    return kind not in _NON_SHRINKING_NORMALIZERS


def token_byte_facts(tokenizer: Any) -> tuple[int, Any]:
    """``(longest vocabulary string in UTF-8 bytes, the normalizer's JSON spec)``: what :func:`prompt_byte_bound`
    reads from a tokenizer (transformers' or ``model_server.native``'s). Blocking, ~0.3 s for a 128k vocabulary
    on a small CPU: :func:`model_server.loading.load_model` works it out on its tokenizer thread."""
    try:
        max_token_bytes = max((len(str(t).encode()) for t in tokenizer.get_vocab()), default=1)
    except Exception:
        max_token_bytes = 256
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        spec = json.loads(backend.to_str()).get("normalizer") if backend is not None else {"type": "?"}
    except Exception:
        spec = {"type": "?"}
    return max_token_bytes, spec


def prompt_byte_bound(tokenizer: Any, max_input_tokens: int, facts: tuple[int, Any] | None = None) -> int:
    """The most UTF-8 bytes a prompt of ``max_input_tokens`` tokens can have (bytes).

    ``max_input_bytes = max_input_tokens x max_token_bytes x k``: no token stands for more input
    bytes than the UTF-8 length of its vocabulary string ``max_token_bytes`` (byte-level BPE spells
    each byte as one character of 1-2 bytes; SentencePiece spells a space as the 3-byte U+2581), so
    a prompt longer than the bound has more tokens than the limit. ``k`` is 1 for tokenizers whose
    normalizer cannot shrink text (none, NFC, NFD, Prepend, growing Replace) and
    :data:`SHRINK_FACTOR` (4) otherwise. The bound never refuses a prompt that would fit; it caps
    the tokenizer's work per request at about ``max_input_bytes``. ``facts``: :func:`token_byte_facts`
    of ``tokenizer`` when already worked out.
    """
    max_token_bytes, spec = facts if facts is not None else token_byte_facts(tokenizer)
    k = SHRINK_FACTOR if _normalizer_may_shrink(spec) else 1
    return max(1, int(max_input_tokens)) * max(1, max_token_bytes) * k


def check_prompt_bytes(runtime, text: str, param: str) -> None:
    """Refuse a prompt longer than the byte bound before tokenizing it (same error as too many tokens)."""
    bound = runtime.limits.max_input_bytes
    if bound is None or len(text) * 4 <= bound:      # chars x 4 >= UTF-8 bytes: no encode needed
        return
    n = len(text.encode("utf-8", "surrogatepass"))
    if n > bound:
        raise ApiError(422, f"the prompt is {n} bytes; this model accepts at most {runtime.limits.max_input_tokens} "
                            f"input tokens, at most {bound} bytes", param=param, code="context_length_exceeded")


def tokenize_prompt(runtime, text: str, add_special_tokens: bool = True, *, param: str = "prompt",
                    keep_tail: bool = False) -> list[int]:
    """Token ids of ``text`` after the byte-bound check. ``keep_tail``: instead of refusing a longer
    text, tokenize only its last ``max_input_bytes`` bytes (for TGI's ``truncate``, which keeps the
    last tokens). Blocking: call it through :func:`run_tokenizer`."""
    bound = runtime.limits.max_input_bytes
    if keep_tail and bound is not None and len(text) > bound // 4:
        raw = text.encode("utf-8", "surrogatepass")
        if len(raw) > bound:
            text = raw[-bound:].decode("utf-8", "ignore")     # a cut character is dropped
    check_prompt_bytes(runtime, text, param)
    tok = runtime.loaded.tokenizer
    # transformers' call releases the GIL while the Rust tokenizer works (its plain ``encode`` does not)
    return list(tok(text, add_special_tokens=add_special_tokens)["input_ids"])


async def run_tokenizer(runtime, fn: Callable[..., _T], *args: Any) -> _T:
    """Run ``fn(*args)`` (tokenization, chat template) in the runtime's tokenizer thread: the event loop
    keeps serving /health and other streams meanwhile. One thread: calls never share the tokenizer."""
    return await asyncio.get_running_loop().run_in_executor(runtime.tokenizer_pool, fn, *args)


def check_prompt_ids(runtime, ids: list[int], param: str) -> None:
    """Token ids given directly must be ints inside the model's vocabulary."""
    lim = runtime.limits.max_input_tokens
    if lim is not None and len(ids) > lim:        # before looking at each id: the count alone decides
        raise ApiError(422, f"the prompt has {len(ids)} tokens; this model accepts at most {lim} input tokens",
                       param=param, code="context_length_exceeded")
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
