"""The generation routes' backend side over aiohttp's client (:class:`AiohttpRelay`).

Used for https backends and when ``proxy.stream_relay`` is ``aiohttp``; one task wake per chunk
(the raw relay avoids that on plain http). Owns: sending a generation request on the proxy's
``aiohttp.ClientSession`` and relaying its SSE body with ``iter_any``. Must not: own the session
(``app.ProxyCore`` does: pass-through and WebSocket routes use it too), answer failures before
the response head (``forward``).
"""
from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from edge_proxy.proxy.errors import Api, error_event, failure_message
from edge_proxy.proxy.hooks import RequestRecord
from edge_proxy.proxy.relay import (
    BackendResponse, StreamAccounting, client_gone, mark_terminated, relay_chunk, stream_rest)
from edge_proxy.proxy.sse import EventTooLarge, SSESplitter


class AiohttpRelay:
    """:class:`~edge_proxy.proxy.relay.Relay` over ``session`` to the backend at ``backend_url``."""

    name = "aiohttp"

    def __init__(self, session: aiohttp.ClientSession, backend_url: str,
                 upstream_timeout_seconds: float) -> None:
        self.session = session
        self.backend_url = backend_url
        self.upstream_timeout_seconds = upstream_timeout_seconds
        self._urls: dict[str, URL] = {}

    def _url(self, path_qs: str) -> URL:
        """Backend URL for a request path, built once per distinct path (bounded cache)."""
        url = self._urls.get(path_qs)
        if url is None:
            url = URL(self.backend_url + path_qs, encoded=True)
            if len(self._urls) < 256:
                self._urls[path_qs] = url
        return url

    async def send(self, path_qs: str, body: bytes, headers: CIMultiDict[str],
                   head_timeout: float) -> BackendResponse:
        async with asyncio.timeout(head_timeout or None):
            return await self.session.request("POST", self._url(path_qs), data=body, headers=headers,
                                              allow_redirects=False)

    async def stream(self, request: web.Request, rec: RequestRecord, resp: BackendResponse,
                     out: web.StreamResponse, acct: StreamAccounting, splitter: SSESplitter) -> None:
        assert isinstance(resp, aiohttp.ClientResponse)
        api: Api = rec.api  # type: ignore[assignment]
        try:
            try:
                async for chunk in resp.content.iter_any():
                    kept = relay_chunk(splitter, acct, chunk, time.monotonic_ns())
                    if kept is not None:
                        await out.write(kept)
                        if acct.terminated:
                            mark_terminated(rec, acct)
                rest = stream_rest(acct, splitter)
                if rest:
                    await out.write(rest)
                mark_terminated(rec, acct)
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                    aiohttp.ClientOSError) as exc:
                if acct.terminated:      # the client has the whole answer: nothing to report
                    await out.write_eof()
                    return
                rec.outcome = "error"
                rec.error_type = "stream_broken"
                await out.write(error_event(api, "stream_broken", failure_message(
                    exc, self.backend_url, self.upstream_timeout_seconds, acct.counted)))
            except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
                if acct.terminated:
                    await out.write_eof()
                    return
                rec.outcome = "timeout"
                rec.error_type = "timeout"
                await out.write(error_event(
                    api, "timeout", f"backend sent nothing for {self.upstream_timeout_seconds:g} s"))
            except EventTooLarge as exc:
                resp.close()
                rec.outcome = "error"
                rec.error_type = "stream_broken"
                await out.write((exc.kept or b"") + error_event(api, "stream_broken", str(exc)))
            await out.write_eof()
        except ConnectionResetError:  # aiohttp.ClientConnectionResetError is one too
            # Writing to a client that is gone (without handler cancellation); after the
            # terminator the outcome is already final (ok).
            client_gone(rec)
            raise asyncio.CancelledError() from None
        finally:
            acct.finish()
            rec.t_end_ns = time.monotonic_ns()

    async def close(self) -> None:
        return None      # the session is the core's
