"""What the model server accepts from clients written for other servers (docs/model_server.md,
Compatibility): the served model's names, and the one policy for request parameters it does not
implement.

Policy: a parameter is either implemented or refused with a 400 that names it; nothing is
silently ignored. Implemented: ``seed`` with sampling on engines that sample per request from a
seed (the ``fast`` engine); the ``transformers`` engine samples inside transformers' shared batch,
which has no per-request generator, so there a seeded *sampled* request is refused (a greedy
request is deterministic already and accepts any seed). Refused when set to anything but their
neutral value: the OpenAI parameters in :data:`OPENAI_REFUSED`.
"""
from __future__ import annotations

import os
from typing import Any

from model_server.engines.base import SamplingParams
from model_server.generation import ApiError

# parameter -> values that mean "not used" (anything else is refused with a 400 naming it)
OPENAI_REFUSED: dict[str, tuple[Any, ...]] = {
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "suffix": (None, ""),
    "top_logprobs": (None, 0),
    "prediction": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
}


def default_served_name(model: str) -> str:
    """``--model-name`` default: a local directory's basename (``./models/llama-1b`` ->
    ``llama-1b``); a hub id (``org/name``, not a local path) as given."""
    if os.path.exists(model):
        return os.path.basename(os.path.normpath(os.path.abspath(model)))
    return model


def check_openai_params(body: dict[str, Any]) -> None:
    """Refuse (400, naming the parameter) what this server does not implement."""
    for key, neutral in OPENAI_REFUSED.items():
        if key in body and body[key] not in neutral:
            raise ApiError(400, f"`{key}` is not supported by this server (omit it; docs/model_server.md, "
                                "Compatibility)", param=key)


def check_seed(engine: Any, sp: SamplingParams, param: str, status: int = 400) -> None:
    """A seeded sampled request needs an engine that honours per-request seeds."""
    if sp.seed is not None and sp.do_sample and not getattr(engine, "supports_seed", False):
        name = getattr(engine, "name", "this")
        raise ApiError(status, f"`{param}` with sampling is not supported by the {name} engine "
                               "(its batched sampling has no per-request seed): serve with --engine fast, "
                               "or omit the seed, or sample greedily (temperature 0)", param=param)


def seed_used(engine: Any, sp: SamplingParams) -> int | None:
    """The seed to report (TGI ``details.seed``): only a seed that drove the sampling."""
    if sp.seed is not None and sp.do_sample and getattr(engine, "supports_seed", False):
        return sp.seed
    return None
