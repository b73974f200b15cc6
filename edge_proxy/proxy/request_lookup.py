"""``GET /edge/requests/{request_id}``: one recent request's final energy, tokens and timing.

For clients that need each request's attributed joules (``edge-eval eval``): every instrumented
response carries ``x-edge-request-id``; a client then asks the metrics port (or the main port when
there is no metrics port) with ``Authorization: Bearer <energy.lookup_token>``. The answer::

    {"request_id": "...", "final": true, "model": "tiny", "outcome": "ok", "status": 200,
     "input_tokens": 31, "output_tokens": 4, "duration_seconds": 0.05, "ttft_seconds": 0.02,
     "energy": {"full_joules": 1.2, "active_joules": 0.9, "source": "nvml",
                "attribution": "token-weighted", "provisional": false}}

``energy`` is null when no energy source runs. ``?wait=SECONDS`` (at most 60) waits until the
request is final (its energy is final a sampling tick after its end); a request still in flight
when the wait ends is answered with ``"final": false``. 404 for an unknown or expired id (the last
``CAPACITY`` requests are kept, never any text) and when no token is configured; 401 without the
right token.
"""
from __future__ import annotations

import asyncio
import hmac
import time
from collections import OrderedDict
from typing import Any

from aiohttp import web

from edge_proxy.proxy.hooks import BaseObserver, RequestRecord

CAPACITY = 10_000
MAX_WAIT_SECONDS = 60.0
ROUTE = "/edge/requests/{request_id}"


def lookup_record(rec: RequestRecord, final: bool) -> dict[str, Any]:
    """The JSON fields of one request (no prompt or completion text)."""
    energy = None
    if rec.energy is not None:
        e = rec.energy
        energy = {"full_joules": e.full_joules, "active_joules": e.active_joules,
                  "source": e.source, "attribution": e.attribution, "provisional": e.provisional}
    return {"request_id": rec.request_id, "final": final, "model": rec.model,
            "route": rec.route, "traffic": rec.traffic, "outcome": rec.outcome,
            "status": rec.status, "input_tokens": rec.input_tokens,
            "output_tokens": rec.output_tokens, "token_count_source": rec.token_count_source,
            "duration_seconds": rec.duration_seconds, "ttft_seconds": rec.ttft_seconds,
            "energy": energy}


class RequestLookup(BaseObserver):
    """Bounded map request id -> record (in flight, then final) and the lookup handler."""

    def __init__(self, token: str, capacity: int = CAPACITY) -> None:
        self.token = token
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[RequestRecord, bool]] = OrderedDict()

    def _put(self, rec: RequestRecord, final: bool) -> None:
        self._items[rec.request_id] = (rec, final)
        self._items.move_to_end(rec.request_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def on_request_start(self, rec: RequestRecord) -> None:
        self._put(rec, False)

    def on_request_final(self, rec: RequestRecord) -> None:
        self._put(rec, True)

    async def handle(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not hmac.compare_digest(
                auth[7:].strip().encode(), self.token.encode()):
            return _error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        try:
            wait = min(MAX_WAIT_SECONDS, max(0.0, float(request.query.get("wait", "0"))))
        except ValueError:
            return _error(400, "wait must be a number of seconds")
        rid = request.match_info["request_id"]
        deadline = time.monotonic() + wait
        while True:
            entry = self._items.get(rid)
            if entry is None:
                return _error(404, "unknown or expired request id")
            rec, final = entry
            if final or time.monotonic() >= deadline:
                return web.json_response(lookup_record(rec, final))
            await asyncio.sleep(0.02)


async def _disabled(request: web.Request) -> web.Response:
    return _error(404, "request lookup is disabled: set energy.lookup_token")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}}, status=status,
                             headers=headers)


def attach_request_lookup(runtime: Any) -> RequestLookup | None:
    """``build_proxy`` hook: the observer (after the energy component, so records carry final
    energy) and the route on the metrics app (or the main app without a metrics port)."""
    app = runtime.metrics_app or runtime.app
    token = getattr(runtime.settings.energy, "lookup_token", None)
    if not token:
        app.router.add_get(ROUTE, _disabled)
        return None
    lookup = RequestLookup(token)
    runtime.observers.append(lookup)
    runtime.components["request_lookup"] = lookup
    app.router.add_get(ROUTE, lookup.handle)
    return lookup
