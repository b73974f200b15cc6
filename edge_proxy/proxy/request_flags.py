"""Read a request's boolean flags (``stream``, ``stream_options.include_usage``) the way the backend
will, so the proxy records what the backend actually does.

- OpenAI-compatible servers built on pydantic (vLLM, and others) validate ``bool`` fields in lax
  mode: ``true``/``false``, the integers 1/0, the floats 1.0/0.0, and the strings (any case) ``1 t
  true y yes on`` / ``0 f false n no off`` are booleans; anything else is a 400.
- TGI (serde) and our model server accept only JSON ``true``/``false``.
A value the backend refuses reads as false here: the backend answers 400 and nothing streams.
"""
from __future__ import annotations

from typing import Any

_TRUE = frozenset({"1", "t", "true", "y", "yes", "on"})

STRICT_KINDS = frozenset({"tgi", "model_server"})


def backend_bool(value: Any, backend_kind: str) -> bool:
    """``value`` as the backend of ``backend_kind`` coerces it (True only when it means true)."""
    if value is True:
        return True
    if backend_kind in STRICT_KINDS or value is None or value is False:
        return False
    if isinstance(value, (int, float)):
        return value == 1
    if isinstance(value, str):
        return value.lower() in _TRUE
    return False
