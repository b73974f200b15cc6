"""Slow and malformed clients on raw sockets: request heads and bodies have deadlines, a request
is in flight only once its body is complete, and aiohttp's protocol errors are answered in JSON
and logged as one rate-limited line each."""
from __future__ import annotations

import asyncio
import json
import logging
import time

import aiohttp
import pytest

from tests.proxy_support import InProcessUpstream, metric_value
from tests.running_proxy_support import running_proxy

pytestmark = pytest.mark.asyncio
HEAD_T = 0.5
BODY_T = 1.5


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _read_all(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    """Everything until the proxy closes the connection (bounded)."""
    return await asyncio.wait_for(reader.read(), timeout)


def _body_of(raw: bytes) -> bytes:
    return raw.partition(b"\r\n\r\n")[2]


async def test_trickled_heads_get_408_and_are_closed() -> None:
    async with InProcessUpstream() as up, running_proxy(
            up.url, request_header_timeout_seconds=HEAD_T, request_body_timeout_seconds=BODY_T) as px:
        conns = [await _open(px.port) for _ in range(40)]
        silent = [await _open(px.port) for _ in range(10)]      # connect and never send a byte
        t0 = time.monotonic()

        async def trickle(w: asyncio.StreamWriter) -> None:
            w.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            try:
                for i in range(100):            # one header byte every 50 ms: never a whole head
                    w.write(b"X"[:1])
                    await w.drain()
                    await asyncio.sleep(0.05)
            except ConnectionError:
                pass

        tasks = [asyncio.create_task(trickle(w)) for _, w in conns]
        answers = await asyncio.gather(*(_read_all(r) for r, _ in conns))
        for a in answers:
            assert a.startswith(b"HTTP/1.1 408"), a[:80]
            assert "error" in json.loads(_body_of(a))
        assert [await _read_all(r) for r, _ in silent] == [b""] * 10     # closed, nothing said
        assert time.monotonic() - t0 < 5 * HEAD_T + 5.0                 # bounded (not 75 s)
        for t in tasks:
            t.cancel()
        for _, w in conns + silent:
            w.close()
        assert up.state.requests == []


async def test_incomplete_body_is_not_in_flight_and_gets_408() -> None:
    async with InProcessUpstream() as up, running_proxy(
            up.url, request_header_timeout_seconds=HEAD_T, request_body_timeout_seconds=BODY_T) as px:
        pending = []
        for _ in range(20):
            r, w = await _open(px.port)
            w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000\r\n\r\n{\"model\": ")
            await w.drain()
            pending.append((r, w))
        await asyncio.sleep(0.3)
        assert metric_value(px.metrics_text(), "edge_proxy_in_flight_requests") == 0
        answers = await asyncio.gather(*(_read_all(r) for r, _ in pending))
        for a in answers:
            assert a.startswith(b"HTTP/1.1 408"), a[:80]
            err = json.loads(_body_of(a))["error"]          # OpenAI format on /v1/*
            assert err["code"] == "client_timeout" and err["type"] == "invalid_request_error"
        await px.drain()
        assert metric_value(px.metrics_text(), "edge_proxy_in_flight_requests") == 0
        assert metric_value(px.metrics_text(), "edge_proxy_requests_total", status="408") == 20
        assert up.state.requests == []
        for _, w in pending:
            w.close()


async def test_kept_alive_client_idle_past_the_head_deadline_is_served() -> None:
    async with InProcessUpstream() as up, running_proxy(
            up.url, request_header_timeout_seconds=HEAD_T, request_body_timeout_seconds=BODY_T) as px:
        async with aiohttp.ClientSession() as s:
            for _ in range(2):
                async with s.post(px.url + "/v1/completions",
                                  json={"model": "fake-model", "prompt": "a b", "max_tokens": 2}) as r:
                    assert r.status == 200
                await asyncio.sleep(HEAD_T * 2)       # idle on the kept-alive connection
            # a slow but steady body within the deadline is fine
            r_, w = await _open(px.port)
            body = json.dumps({"model": "fake-model", "prompt": "a b", "max_tokens": 2}).encode()
            w.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
            for i in range(0, len(body), 8):
                w.write(body[i:i + 8])
                await asyncio.sleep(0.02)
            a = await _read_all(r_)
            assert a.startswith(b"HTTP/1.1 200"), a[:80]
            w.close()


@pytest.mark.parametrize("request_bytes", [
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",         # header too long
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",          # bad length
    b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"GET /\x00 HTTP/1.1\r\n\r\n",                                                        # bad request line
], ids=["header-too-long", "bad-content-length", "two-content-lengths", "bad-request-line"])
async def test_protocol_errors_are_json_and_one_rate_limited_line(request_bytes: bytes, caplog) -> None:
    caplog.set_level(logging.INFO, logger="edge_proxy")
    async with InProcessUpstream() as up, running_proxy(up.url) as px:
        for _ in range(30):
            r, w = await _open(px.port)
            w.write(request_bytes)
            await w.drain()
            a = await _read_all(r)
            w.close()
            assert a.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), a[:120]
            assert b"application/json" in a.partition(b"\r\n\r\n")[0]
            assert "error" in json.loads(_body_of(a))
    lines = [rec for rec in caplog.records if rec.name == "edge_proxy" and "400 from" in rec.getMessage()]
    assert 1 <= len(lines) <= 5                               # rate-limited: 30 errors, <= 5 lines
    assert all(rec.exc_info is None and "\n" not in rec.getMessage() for rec in lines)
    assert "Traceback" not in caplog.text and "aaaa" not in caplog.text   # client bytes not echoed


async def test_pipelined_partial_head_never_breaks_the_response_in_progress() -> None:
    async with InProcessUpstream() as up, running_proxy(
            up.url, request_header_timeout_seconds=HEAD_T, request_body_timeout_seconds=BODY_T) as px:
        up.state.release = asyncio.Event()
        r, w = await _open(px.port)
        body = json.dumps({"model": "fake-model", "prompt": "a b", "max_tokens": 3, "stream": True}).encode()
        w.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"x-fake-fault: hold-first\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        await w.drain()
        await asyncio.sleep(0.2)                           # (a separate read on the proxy's side)
        w.write(b"GET /health HTTP/1.1\r\nHo")            # the next request's head, never finished
        await w.drain()
        await asyncio.sleep(HEAD_T * 3)                    # past the head deadline, stream held
        up.state.release.set()
        data = b""
        while b"data: [DONE]" not in data:
            more = await asyncio.wait_for(r.read(65536), 10)
            if not more:
                break                                      # closed before the end: a failure
            data += more
        assert data.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in data
        assert b"HTTP/1.1 408" not in data                 # (not bare "408": ids, timestamps, chunk sizes hold it)
        w.close()
