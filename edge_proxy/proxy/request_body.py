"""A generation request's body: what the proxy reads from it and the one change it may make.

Owns: the stream flag (read the way the backend will, ``request_flags``), the requested model and
token limit, and asking an OpenAI stream for usage (:func:`with_include_usage`: the proxy's token
counts then come from the backend; the usage chunk is stripped again before the client sees it
when the client did not ask for it). Must not: forward, label metrics or answer the client.
"""
from __future__ import annotations

import json
from typing import Any

from edge_proxy.proxy.forward_routes import RouteSpec
from edge_proxy.proxy.hooks import RequestRecord
from edge_proxy.proxy.request_flags import backend_bool

_INCLUDE_USAGE = b'"stream_options":{"include_usage":true}'


def with_include_usage(body: bytes, obj: dict[str, Any]) -> bytes:
    """The request body asking for usage in the stream (``stream_options.include_usage``).

    ``obj`` is ``body`` parsed (a JSON object). Without ``stream_options`` the field is inserted
    before the closing brace and every other byte is the client's (no re-encoding: cheaper, and
    the backend sees the client's own formatting); otherwise the object is re-encoded with
    ``include_usage`` set in the client's ``stream_options``."""
    head = body.lstrip()[:2]
    # splice only into UTF-8 without a BOM (json.loads also reads UTF-16/32 and a BOM)
    if "stream_options" not in obj and head[:1] == b"{" and head[1:] != b"\x00":
        end = body.rstrip().rfind(b"}")
        if end > 0:
            return body[:end] + (b"," if obj else b"") + _INCLUDE_USAGE + body[end:]
    so = obj.get("stream_options")
    so = dict(so) if isinstance(so, dict) else {}
    so["include_usage"] = True
    return json.dumps(dict(obj, stream_options=so)).encode()


def read_generation(rec: RequestRecord, spec: RouteSpec, body: bytes, obj: dict[str, Any],
                    backend_kind: str) -> tuple[bytes, bool, Any]:
    """Set ``rec.stream`` and ``rec.max_tokens`` from the parsed body ``obj``. Returns the body to
    send (usage asked for on an OpenAI stream), whether to strip the usage chunk from the client's
    stream, and the requested model (any JSON value; the caller labels it)."""
    strip_usage = False
    if spec.api == "openai":
        # the flag as the backend will read it (vLLM coerces "yes", 1, "true": request_flags)
        rec.stream = backend_bool(obj.get("stream"), backend_kind)
        requested_model = obj.get("model")
        mt = obj.get("max_completion_tokens", obj.get("max_tokens"))
        if rec.stream:
            so = obj.get("stream_options")
            if not (isinstance(so, dict) and backend_bool(so.get("include_usage"), backend_kind)):
                body = with_include_usage(body, obj)
                strip_usage = True
    else:
        rec.stream = spec.stream if spec.stream is not None else backend_bool(obj.get("stream"), "tgi")
        params = obj.get("parameters")
        mt = params.get("max_new_tokens") if isinstance(params, dict) else None
        requested_model = obj.get("model")
    rec.max_tokens = mt if isinstance(mt, int) and not isinstance(mt, bool) else None
    return body, strip_usage, requested_model
