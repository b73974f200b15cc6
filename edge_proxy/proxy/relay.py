"""The one interface to the backend on the generation routes: :class:`Relay`.

A relay sends one generation request and returns at the backend's response head
(:meth:`Relay.send` -> :class:`BackendResponse`), and relays a streamed (SSE) response body to the
client (:meth:`Relay.stream`): framing, token accounting and the stream's outcome on the record.
Two implementations, picked once at start-up (``proxy.stream_relay``, see ``app.ProxyCore.open``):

- ``relay_raw.RawRelay``: the lean HTTP/1.1 client (plain http backends; the hot path);
- ``relay_aiohttp.AiohttpRelay``: aiohttp's client (https backends, or ``stream_relay: aiohttp``).

Shared here: one chunk's framing and accounting (:func:`relay_chunk`), the terminator rule
(:func:`mark_terminated`), the bytes still held at the end of a stream (:func:`stream_rest`) and how
a response is given back (:func:`done_with`). Must not: parse request bodies, choose routes or
answer failures before the response head (``forward``).
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol

from aiohttp import web
from multidict import CIMultiDict

from edge_proxy.proxy.hooks import RequestRecord
from edge_proxy.proxy.sse import EventTooLarge, SSESplitter, event_data
from edge_proxy.proxy.token_accounting import OpenAIStream, TGIStream

StreamAccounting = OpenAIStream | TGIStream


class BackendResponse(Protocol):
    """What the proxy uses of a backend response (``aiohttp.ClientResponse`` has it; so does
    ``raw_pool.RawResponse``)."""

    status: int
    reason: str | None

    @property
    def headers(self) -> Mapping[str, str]: ...
    async def read(self) -> bytes: ...
    def release(self) -> Any: ...
    def close(self) -> None: ...


class Relay(Protocol):
    """The backend side of a generation request (see the module docstring)."""

    name: str                 # "raw" | "aiohttp" (proxy.stream_relay)

    async def send(self, path_qs: str, body: bytes, headers: CIMultiDict[str],
                   head_timeout: float) -> BackendResponse:
        """POST ``body`` to ``path_qs`` on the backend; return once the response head arrived
        (within ``head_timeout`` seconds; 0: the relay's read timeout). Raises
        ``aiohttp.ClientError`` or ``asyncio.TimeoutError``."""
        ...

    async def stream(self, request: web.Request, rec: RequestRecord, resp: BackendResponse,
                     out: web.StreamResponse, acct: StreamAccounting, splitter: SSESplitter) -> None:
        """Relay ``resp``'s SSE body to the prepared ``out``: sets ``rec.outcome`` (ok, error,
        timeout, cancelled), writes one error event when the stream breaks, ends the body. A
        client that went away raises ``asyncio.CancelledError``."""
        ...

    async def close(self) -> None:
        """Drop the relay's idle connections (at shutdown)."""
        ...


def relay_chunk(splitter: SSESplitter, acct: Any, chunk: bytes, t_ns: int) -> bytes | None:
    """One chunk from the backend: the complete SSE events in it, accounted (tokens, usage) and
    kept or dropped by ``acct``; the bytes to send to the client, or None if nothing is to go."""
    try:
        events = splitter.feed(chunk)
    except EventTooLarge as exc:     # the events before the endless one still go to the client
        parts = [kept for ev in exc.events if (kept := acct.event(ev, event_data(ev), t_ns)) is not None]
        exc.kept = b"".join(parts) if parts else None
        raise
    if not events:
        return None
    if len(events) == 1:
        ev = events[0]
        return acct.event(ev, event_data(ev), t_ns)
    parts = [kept for ev in events if (kept := acct.event(ev, event_data(ev), t_ns)) is not None]
    return b"".join(parts) if parts else None


def stream_rest(acct: Any, splitter: SSESplitter) -> bytes:
    """What is still held when the backend's body ended: the usage-stripped OpenAI stream's
    pending chunk and an unterminated last event (passed on as it is)."""
    return (acct.flush() if isinstance(acct, OpenAIStream) else b"") + splitter.pending


def mark_terminated(rec: RequestRecord, acct: Any) -> None:
    """The stream's terminator reached the client: the outcome is final now (docs/metrics.md,
    Outcomes). A client that closes right after reading it (the openai SDK, huggingface_hub and
    other httpx clients do) did not cancel anything: the request is ok."""
    if rec.outcome is None:
        rec.outcome = "error" if acct.backend_error else "ok"
        if acct.backend_error:
            rec.error_type = "upstream_status"


def client_gone(rec: RequestRecord) -> None:
    """Writing to a client that is gone: cancelled with status 499, unless the terminator already
    reached it (then the outcome is final: ok)."""
    if rec.outcome is None:
        rec.outcome = "cancelled"
        rec.error_type = "client_disconnect"
        rec.status = 499


def done_with(resp: BackendResponse, complete: bool) -> None:
    """Give a backend response back: a fully read one keeps its connection for reuse; otherwise
    (client gone, error, timeout) the connection is dropped at once."""
    if complete:
        resp.release()
    else:
        resp.close()
