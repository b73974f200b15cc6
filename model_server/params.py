"""Typed, range-checked reads of request JSON fields (raise ApiError with the field name)."""
from __future__ import annotations

import math
from typing import Any

from model_server.generation import ApiError

_MISSING = object()


def _bad(param: str, message: str) -> ApiError:
    return ApiError(422, message, kind="validation", param=param)


def get_int(body: dict[str, Any], key: str, *, default: int | None, lo: int | None = None,
            hi: int | None = None, name: str | None = None) -> int | None:
    name = name or key
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and (not value.is_integer())):
        raise _bad(name, f"`{name}` must be an integer")
    value = int(value)
    if lo is not None and value < lo:
        raise _bad(name, f"`{name}` must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise _bad(name, f"`{name}` must be <= {hi}, got {value}")
    return value


def get_float(body: dict[str, Any], key: str, *, default: float | None, lo: float | None = None,
              hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
              name: str | None = None) -> float | None:
    name = name or key
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, f"`{name}` must be a number")
    value = float(value)
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise _bad(name, f"`{name}` must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise _bad(name, f"`{name}` must be {'<' if hi_open else '<='} {hi}, got {value}")
    return value


def get_bool(body: dict[str, Any], key: str, *, default: bool, name: str | None = None) -> bool:
    name = name or key
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, f"`{name}` must be a boolean")
    return value


def get_stops(body: dict[str, Any], key: str, *, max_items: int = 16, name: str | None = None) -> list[str]:
    name = name or key
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _bad(name, f"`{name}` must be a string or a list of strings")
    if len(value) > max_items:
        raise _bad(name, f"`{name}` accepts at most {max_items} sequences, got {len(value)}")
    if any(s == "" for s in value):
        raise _bad(name, f"`{name}` sequences must not be empty")
    return list(value)
