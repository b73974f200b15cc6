"""The serve path without transformers: our own model build and tokenizer for the common case.

``import transformers`` (its config and tokenizer chain pulls in ``torch.distributed.tensor``,
``torch._dynamo`` and ``sympy`` at module level, then ``modeling_llama``) held the GIL for most of a
cold start's load (docs/benchmarks.md, "Spawn to first token"). For what the fast engine serves most
(a local directory with one ``model.safetensors``, a Llama or Qwen2 causal LM, ``tokenizer.json``) the
server needs none of it:

* :mod:`.config`: ``config.json`` and ``generation_config.json`` read by hand, with transformers'
  defaults for the fields the server reads; :func:`.config.unsupported_reason` says when not to try;
* :mod:`.rope` and :mod:`.modeling`: an ``nn.Module`` tree with transformers' parameter names and
  shapes and the same RMSNorm / rotary arithmetic, built on the meta device;
* :mod:`.build`: the checkpoint's tensors assigned into it (what :mod:`model_server.fast_load` does with
  transformers' model);
* :mod:`.tokenizer` and :mod:`.chat_template`: a wrapper over ``tokenizers.Tokenizer`` with the surface
  the server uses, and chat templates rendered as transformers renders them.

Anything outside that case (or ``MODEL_SERVER_NO_TRANSFORMERS=0``) keeps using transformers; each
fallback logs one line saying why. This package must not import transformers.
"""
from __future__ import annotations

import os

ENV = "MODEL_SERVER_NO_TRANSFORMERS"


def enabled() -> bool:
    """``MODEL_SERVER_NO_TRANSFORMERS``: ``0`` forces transformers' model and tokenizer; default on."""
    return os.environ.get(ENV, "1").strip() != "0"
