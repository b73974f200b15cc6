"""Header handling for a reverse proxy (RFC 9110 §7.6.1 hop-by-hop fields)."""
from __future__ import annotations

from typing import Mapping

from multidict import CIMultiDict

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authenticate", "proxy-authorization",
})
# Also dropped: recomputed by the HTTP layer on each hop.
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "expect"}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    value = headers.get("connection")
    if not value:
        return set()
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def request_headers(incoming: Mapping[str, str], peer: str | None) -> CIMultiDict[str]:
    """Headers to send to the backend: end-to-end fields only, plus X-Forwarded-For."""
    drop = _REQUEST_DROP | _connection_tokens(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in incoming.items():  # type: ignore[attr-defined]
        if k.lower() not in drop:
            out.add(k, v)
    if peer:
        prior = out.get("X-Forwarded-For")
        out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    return out


def response_headers(incoming: Mapping[str, str]) -> CIMultiDict[str]:
    """Headers to send to the client: end-to-end fields of the backend response."""
    drop = _RESPONSE_DROP | _connection_tokens(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in incoming.items():  # type: ignore[attr-defined]
        if k.lower() not in drop:
            out.add(k, v)
    return out
