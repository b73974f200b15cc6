"""Error bodies in the client API's own format (OpenAI or TGI), as plain responses or SSE events.

OpenAI: ``{"error": {"message", "type", "param", "code"}}`` (what the official client parses).
TGI: ``{"error": message, "error_type": type}`` (what the ``text_generation`` client parses).
A stream that breaks after its headers were sent ends with one ``data:`` event carrying the same
body, which both clients turn into an exception.
"""
from __future__ import annotations

import json
from typing import Literal

from aiohttp import web

Api = Literal["openai", "tgi", "other"]

# error_type (bounded vocabulary of RequestRecord.error_type) -> (OpenAI type, TGI error_type)
_TYPES: dict[str, tuple[str, str]] = {
    "bad_request": ("invalid_request_error", "validation"),
    "too_large": ("invalid_request_error", "validation"),
    "connect": ("upstream_error", "upstream"),
    "timeout": ("timeout", "upstream"),
    "upstream_status": ("upstream_error", "upstream"),
    "stream_broken": ("upstream_error", "upstream"),
    "hold_timeout": ("server_overloaded", "overloaded"),
    "hold_full": ("server_overloaded", "overloaded"),
    "spawn_failed": ("upstream_error", "upstream"),
    "fd_exhausted": ("server_overloaded", "overloaded"),      # the proxy's own limit (fd_exhaustion.py)
    "shutdown": ("server_overloaded", "overloaded"),          # cut by the SIGTERM drain bound (shutdown.py)
}


def error_body(api: Api, error_type: str, message: str, status: int) -> bytes:
    """JSON error body for ``api`` (OpenAI format for openai, TGI format otherwise)."""
    oai_type, tgi_type = _TYPES.get(error_type, ("server_error", "upstream"))
    if api == "openai":
        obj: dict[str, object] = {
            "error": {"message": message, "type": oai_type, "param": None, "code": error_type}
        }
    else:
        obj = {"error": message, "error_type": tgi_type}
    return json.dumps(obj).encode()


def error_response(api: Api, status: int, error_type: str, message: str) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(api, error_type, message, status),
        content_type="application/json",
    )


def error_event(api: Api, error_type: str, message: str) -> bytes:
    """One SSE event that ends a broken stream (both official clients raise on it)."""
    sep = b"data: " if api == "openai" else b"data:"
    return sep + error_body(api, error_type, message, 502) + b"\n\n"
