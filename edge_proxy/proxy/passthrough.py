"""Pass-through routes: every forwarded request that is not a generation request.

Owns: forwarding a request as it is (method, path, body streamed as it arrives) and streaming the
backend's response back; the metadata routes (``GET /v1/models``, ``/info``, ``/health``) are
counted under their route label. Must not: parse bodies, create request records or call
observers (only generation routes are measured per request: ``forward``).
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from yarl import URL

from edge_proxy.proxy.errors import error_response, is_connect_failure
from edge_proxy.proxy.fd_exhaustion import STATUS as FD_STATUS, is_fd_exhaustion
from edge_proxy.proxy.headers import request_headers, response_headers
from edge_proxy.proxy.relay import done_with

if TYPE_CHECKING:
    from edge_proxy.proxy.app import ProxyCore


async def passthrough(core: "ProxyCore", request: web.Request, t0: int,
                      route: str | None) -> web.StreamResponse:
    """Forward any request as-is; stream the response back. ``route``: count it under that label.

    The request body is streamed to the backend as it arrives (no size limit of ours: the
    ``max_body_bytes`` limit is for the bodies the proxy parses, the generation requests), with
    the client's Content-Length when it sent one, else chunked."""
    session = core.session
    assert session is not None
    status = 0
    try:
        headers = request_headers(request.headers, request.remote)
        data: Any = None
        if request.body_exists:
            data = request.content
            length = request.headers.get("Content-Length")
            if length is not None:
                headers["Content-Length"] = length
        try:
            async with asyncio.timeout(core.first_byte_timeout() or None):
                resp = await session.request(
                    request.method, URL(core.backend.url + request.path_qs, encoded=True),
                    data=data, headers=headers, allow_redirects=False)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if is_fd_exhaustion(exc):
                status = FD_STATUS
                return core.fd_exhaustion.response("other", exc)
            # one rule with generation routes: 502 = backend not reached (refused or connect
            # timeout), 504 = reached but no answer in time
            status = 504 if isinstance(exc, asyncio.TimeoutError) and not is_connect_failure(exc) \
                else 502
            if is_connect_failure(exc):
                gate = core.gate
                if gate is not None:
                    gate.notify_backend_failure()
            return error_response(core.api_for_path(request.path), status,
                                  "timeout" if status == 504 else "connect",
                                  core.failure_message(exc))
        complete = False
        try:
            status = resp.status
            out = web.StreamResponse(status=resp.status, reason=resp.reason,
                                     headers=response_headers(resp.headers))
            await out.prepare(request)
            try:
                async for chunk in resp.content.iter_any():
                    await out.write(chunk)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return out   # connection to the client ends without a clean terminator
            await out.write_eof()
            complete = True
            return out
        finally:
            done_with(resp, complete)
    finally:
        if route is not None:
            model = core.model_label(None)
            result = "ok" if 0 < status < 400 else "error"
            core.metrics.requests.labels(model, core.backend.kind, route, "false", str(status),
                                         result).inc()
            core.metrics.duration.labels(model, route, "false", result).observe(
                (time.monotonic_ns() - t0) / 1e9)
