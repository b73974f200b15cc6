"""Which tokenizer a process loads: the native one where it matches transformers', else ``AutoTokenizer``.

Owns that choice and its one log line (``tokenizer: native`` or ``tokenizer: transformers (reason)``); used by
:mod:`model_server.loading` (the engine process) and :mod:`model_server.api_worker` (HTTP worker processes,
which load only the tokenizer). transformers is imported only on the fallback.
"""
from __future__ import annotations

import logging
from typing import Any

from . import ENV, enabled

log = logging.getLogger("model_server.loading")


def load_tokenizer(model_id: str, native: bool = True) -> Any:
    """The tokenizer of ``model_id``: :class:`.tokenizer.NativeTokenizer` when ``native`` (and
    ``MODEL_SERVER_NO_TRANSFORMERS`` is not ``0``) and the directory qualifies, else transformers' own."""
    reason = None
    if native and not enabled():
        reason = f"{ENV}=0"
    if native and reason is None:
        try:
            from .tokenizer import NativeTokenizerUnsupported, from_dir
        except ImportError as exc:          # tokenizers or jinja2 missing
            reason = f"cannot import {exc.name}"
        else:
            try:
                tok = from_dir(model_id)
                log.info("tokenizer: native (tokenizer.json, no transformers)")
                return tok
            except NativeTokenizerUnsupported as exc:
                reason = str(exc)
    if native:
        log.info("tokenizer: transformers (%s)", reason)
    from transformers import AutoTokenizer

    from model_server.log_setup import adopt_transformers_logging

    adopt_transformers_logging()
    return AutoTokenizer.from_pretrained(model_id)
