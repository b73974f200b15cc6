"""Error bodies in the client API's own format (OpenAI or TGI), as plain responses or SSE events.

OpenAI: ``{"error": {"message", "type", "param", "code"}}`` (what the official client parses).
TGI: ``{"error": message, "error_type": type}`` (what the ``text_generation`` client parses).
A stream that breaks after its headers were sent ends with one ``data:`` event carrying the same
body, which both clients turn into an exception. Which format a route gets (:func:`api_for_path`) and
the messages about backend failures (:func:`failure_message`) are decided here too.
"""
from __future__ import annotations

import asyncio
import json
from typing import Literal

import aiohttp
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
    "client_timeout": ("invalid_request_error", "validation"),
    "not_forwarded": ("invalid_request_error", "validation"),
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


def api_for_path(path: str, backend_kind: str) -> Api:
    """The API whose error format a route's clients parse: OpenAI under /v1/, TGI on its own
    routes, else the backend's (an OpenAI-compatible server's other routes: OpenAI)."""
    if path.startswith("/v1/") or path == "/v1":
        return "openai"
    if path in ("/", "/generate", "/generate_stream", "/info", "/health", "/tokenize", "/metrics"):
        return "tgi"
    return "openai" if backend_kind in ("openai", "unknown") else "tgi"


def is_connect_failure(exc: BaseException) -> bool:
    """The backend could not be reached: refused, unreachable, or the connect timed out (502,
    ``connect``; the cold-start gate treats it as a backend that is down)."""
    return isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))


def failure_message(exc: BaseException | str, url: str, timeout_s: float, tokens: int | None = None) -> str:
    """What went wrong with the backend at ``url``, in words a user can act on. ``exc``: the
    exception, or the lean relay's result string (``timeout``, ``broken``, ``error:<detail>``)."""
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)) or exc == "timeout":
        return (f"the backend at {url} sent nothing for {timeout_s:g} s "
                "(proxy.upstream_timeout_seconds); it may be overloaded or stuck")
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        why = os_error.strerror if os_error is not None and os_error.strerror else str(os_error)
        return f"the backend at {url} is unreachable ({why}); is it running and is proxy.backend_url right?"
    after = f" after {tokens} tokens" if tokens else ""
    if isinstance(exc, str) and exc.startswith("error:"):
        return f"the backend at {url} sent a malformed response{after} ({exc[6:].strip()}); see the backend's logs"
    return (f"the backend at {url} closed the connection before the response was complete{after} "
            "(crashed or restarted?); see the backend's logs")
