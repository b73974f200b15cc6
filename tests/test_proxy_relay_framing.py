"""The raw relay never hands one client another client's response: interim (1xx) responses are
skipped, and a connection whose response was not read exactly to its end is never reused.

The backend is a raw-socket HTTP/1.1 server on 127.0.0.1 (asyncio streams), so it can send what
aiohttp's server never would: ``103 Early Hints`` before the answer, bytes after the body.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable

import aiohttp
import pytest

from tests.running_proxy_support import running_proxy

pytestmark = pytest.mark.asyncio

Writer = Callable[[asyncio.StreamWriter, str, bool], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"POST"):
        return None                    # the proxy's backend probe (GET /info, ...): not answered
    length = 0
    for line in head.decode("latin-1").split("\r\n")[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "content-length":
            length = int(v)
    body = await reader.readexactly(length) if length else b"{}"
    return json.loads(body)


class RawBackend:
    """Keep-alive HTTP/1.1 server: for each request, ``respond(writer, marker, stream)`` writes
    the response; ``marker`` is the request's prompt (each client sends its own)."""

    def __init__(self, respond: Writer) -> None:
        self.respond = respond
        self.connections = 0
        self.answered_on: list[int] = []     # per answered request: which connection (1, 2, ...)
        self.server: asyncio.AbstractServer | None = None
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        try:
            while True:
                try:
                    req = await _read_request(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if req is None:
                    return
                marker = str(req.get("prompt", req.get("inputs", "")))
                self.answered_on.append(conn)
                await self.respond(writer, marker, bool(req.get("stream")))
        finally:
            writer.close()

    async def __aenter__(self) -> "RawBackend":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def _completion(marker: str) -> bytes:
    return json.dumps({"id": "x", "object": "text_completion", "model": "m",
                       "choices": [{"index": 0, "text": marker, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()


def _sse(marker: str) -> bytes:
    ev = json.dumps({"id": "x", "object": "text_completion", "model": "m",
                     "choices": [{"index": 0, "text": marker, "finish_reason": None}]})
    return f"data: {ev}\n\ndata: [DONE]\n\n".encode()


async def early_hints_then_answer(writer: asyncio.StreamWriter, marker: str, stream: bool) -> None:
    writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)           # the final head comes in a later read
    if stream:
        body = _sse(marker)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n"
                     + b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body))
    else:
        body = _completion(marker)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                     % (len(body), body))
    await writer.drain()


async def early_hints_same_read(writer: asyncio.StreamWriter, marker: str, stream: bool) -> None:
    body = _completion(marker)
    writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                 b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                 % (len(body), body))
    await writer.drain()


async def too_long_body(writer: asyncio.StreamWriter, marker: str, stream: bool) -> None:
    """Content-Length one byte short, then a stray byte later: the connection must not be reused."""
    body = _completion(marker)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                 % (len(body), body))
    await writer.drain()
    await asyncio.sleep(0.02)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")   # an answer nobody asked for
    await writer.drain()


async def _ask(session: aiohttp.ClientSession, url: str, marker: str, stream: bool) -> tuple[int, str]:
    body = {"model": "m", "prompt": marker, "max_tokens": 1, "stream": stream}
    async with session.post(url + "/v1/completions", json=body,
                            timeout=aiohttp.ClientTimeout(total=10)) as r:
        return r.status, (await r.read()).decode()


def _own(text: str, marker: str, others: list[str]) -> bool:
    return marker in text and not any(o in text for o in others if o != marker)


@pytest.mark.parametrize("respond,stream", [(early_hints_then_answer, False),
                                            (early_hints_then_answer, True),
                                            (early_hints_same_read, False)])
async def test_interim_response_is_skipped_sequential(respond: Writer, stream: bool) -> None:
    markers = [f"client-{i}-marker" for i in range(4)]
    async with RawBackend(respond) as be, running_proxy(be.url) as px:
        assert px.core.relay.name == "raw"         # the default raw relay is under test
        async with aiohttp.ClientSession() as s:
            for m in markers:
                status, text = await _ask(s, px.url, m, stream)
                assert status == 200, (m, status, text)
                assert _own(text, m, markers), (m, text)


async def test_interim_response_is_skipped_concurrent() -> None:
    markers = [f"conc-{i}-marker" for i in range(12)]
    async with RawBackend(early_hints_then_answer) as be, running_proxy(be.url) as px:
        async with aiohttp.ClientSession() as s:
            for _ in range(2):
                results = await asyncio.gather(*(_ask(s, px.url, m, i % 2 == 1)
                                                 for i, m in enumerate(markers)))
                for m, (status, text) in zip(markers, results):
                    assert status == 200 and _own(text, m, markers), (m, status, text)


async def test_connection_with_bytes_after_the_body_is_not_reused() -> None:
    markers = [f"extra-{i}-marker" for i in range(4)]
    async with RawBackend(too_long_body) as be, running_proxy(be.url) as px:
        async with aiohttp.ClientSession() as s:
            for m in markers:
                status, text = await _ask(s, px.url, m, False)
                assert status == 200 and _own(text, m, markers), (m, status, text)
                await asyncio.sleep(0.05)      # the stray answer arrives while the connection idles
        # each stray answer cost its connection: no request went out on a connection used before
        assert len(be.answered_on) == len(markers)
        assert len(set(be.answered_on)) == len(markers), be.answered_on


async def endless_line(writer: asyncio.StreamWriter, marker: str, stream: bool) -> None:
    """One good event, then 20 MB of one SSE line that never ends."""
    ev = _sse(marker).split(b"data: [DONE]")[0]
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + b"%x\r\n%b\r\n" % (len(ev), ev))
    piece = b"data: " + b"x" * (256 * 1024)
    try:
        for _ in range(80):                                      # 20 MB
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            await writer.drain()
            piece = b"x" * (256 * 1024)
    except ConnectionError:
        return                                                   # the proxy hung up: good


@pytest.mark.parametrize("relay", ["raw", "aiohttp"])
async def test_endless_sse_line_ends_the_stream_with_an_error_event(relay: str) -> None:
    async with RawBackend(endless_line) as be, running_proxy(be.url, stream_relay=relay,
                                                             max_sse_event_bytes=65536) as px:
        async with aiohttp.ClientSession() as s:
            body = {"model": "m", "prompt": "long-marker", "max_tokens": 1, "stream": True}
            async with s.post(px.url + "/v1/completions", json=body,
                              timeout=aiohttp.ClientTimeout(total=30)) as r:
                assert r.status == 200
                got = await r.read()
        assert len(got) < 1024 * 1024                            # never the 20 MB line
        events = [e for e in got.split(b"\n\n") if e]
        assert b"long-marker" in events[0]
        err = json.loads(events[-1][len(b"data: "):])["error"]
        assert err["code"] == "stream_broken" and "65536 bytes" in err["message"], err
        await px.drain()
        rec = px.components["recorder"].final[-1]
        assert rec.outcome == "error" and rec.error_type == "stream_broken"
