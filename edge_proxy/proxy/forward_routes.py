"""Which backend routes the client-facing port forwards (``proxy.forward_routes``).

A reverse proxy that forwards every path also publishes its backend's operator endpoints: a model
server's ``/metrics``, ``/energy`` and ``/info`` (which names the model's path on disk), vLLM's
adapter-loading routes. By default only the TGI and OpenAI inference APIs and the backend's health
are forwarded; everything else gets 404 from the proxy (the proxy's own routes, such as
``/edge/feedback``, are not forwarded routes and are not affected).

Patterns: an exact path (``/generate``), a prefix ending in ``*`` (``/v1/models/*``), or ``*``
alone (forward everything, the behaviour of a plain reverse proxy).

Also here: which of the forwarded routes are instrumented (:data:`GENERATION_ROUTES`, measured
per request; :data:`METADATA_ROUTES`, forwarded and counted). Must not: handle requests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from edge_proxy.proxy.errors import Api

DEFAULT_FORWARD_ROUTES: tuple[str, ...] = (
    # TGI
    "/", "/generate", "/generate_stream", "/tokenize", "/health",
    # OpenAI
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/models/*",
)


@dataclass(frozen=True)
class RouteSpec:
    api: Api
    operation: str
    stream: bool | None   # None: from the body's "stream" field


GENERATION_ROUTES: dict[str, RouteSpec] = {
    "/v1/chat/completions": RouteSpec("openai", "chat", None),
    "/v1/completions": RouteSpec("openai", "text_completion", None),
    "/generate": RouteSpec("tgi", "text_completion", False),
    "/generate_stream": RouteSpec("tgi", "text_completion", True),
    "/": RouteSpec("tgi", "text_completion", None),
}
METADATA_ROUTES = frozenset({"/v1/models", "/info", "/health"})


class RouteAllowList:
    """Matches request paths against ``proxy.forward_routes`` patterns."""

    def __init__(self, patterns: Iterable[str]) -> None:
        pats = [p.strip() for p in patterns if p.strip()]
        self.allow_all = "*" in pats
        self.exact = frozenset(p for p in pats if not p.endswith("*"))
        self.prefixes = tuple(p[:-1] for p in pats if p.endswith("*") and p != "*")

    def allows(self, path: str) -> bool:
        return self.allow_all or path in self.exact or (bool(self.prefixes) and path.startswith(self.prefixes))


def check_patterns(patterns: Iterable[str]) -> str | None:
    """A problem with the patterns (one line), or None when they are fine."""
    for p in patterns:
        if p != "*" and not p.startswith("/"):
            return f"proxy.forward_routes: {p!r} must be '*' or start with '/'"
        if "*" in p[:-1]:
            return f"proxy.forward_routes: {p!r}: '*' only at the end"
    return None
