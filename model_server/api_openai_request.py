"""Reading an OpenAI request: prompt or messages to token ids, sampling fields to :class:`SamplingParams`.

Owns the validation of ``/v1/completions`` and ``/v1/chat/completions`` bodies (every refusal is an
:class:`~model_server.generation.ApiError` naming the field). It must not write responses or run
generation (:mod:`model_server.api_openai` does), and tokenizes only when called through
:func:`model_server.api_common.run_tokenizer`.
"""
from __future__ import annotations

from typing import Any

from model_server.api_common import check_prompt_ids, tokenize_prompt
from model_server.compat import check_openai_params, check_seed
from model_server.engines.base import SamplingParams
from model_server.generation import ApiError
from model_server.params import get_bool, get_float, get_int, get_stops


def check_model(runtime, body: dict[str, Any]) -> None:
    """``model``, if given, must be a string; any name is served."""
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise ApiError(400, "`model` must be a string", param="model")
    # One model is served: any name is accepted, as TGI does (huggingface_hub's InferenceClient
    # sends "dummy" or "tgi" to a URL); /info says so (docs/model_server.md, Compatibility).


def sampling_params(runtime, body: dict[str, Any], *, max_key: str,
                    default_max: int | None) -> tuple[SamplingParams, list[str], dict[str, Any]]:
    """The request's sampling fields as :class:`SamplingParams`, its stop strings, and the options the
    response needs (``stream``, ``include_usage``, ``max_given``, ``max_key``); ApiError(400) otherwise."""
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


def fit_default_max(runtime, sp: SamplingParams, n_prompt: int, given: bool) -> SamplingParams:
    """Without an explicit max, use what the context leaves (OpenAI semantics), capped by the default."""
    if given or runtime.limits.max_total_tokens is None:
        return sp
    room = max(1, runtime.limits.max_total_tokens - n_prompt)
    return SamplingParams(**{**sp.__dict__, "max_new_tokens": min(sp.max_new_tokens, room)})


def prompt_ids_completions(runtime, body: dict[str, Any]) -> list[int]:
    """``prompt`` (text, token ids, or a one-element list of either) as token ids. Blocking: tokenizes."""
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


def prompt_ids_chat(runtime, body: dict[str, Any]) -> list[int]:
    """``messages`` through the model's chat template, as token ids. Blocking: tokenizes."""
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
