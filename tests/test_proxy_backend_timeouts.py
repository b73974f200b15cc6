"""A hung backend (accepts, reads, never answers) and an unreachable one (connect times out):
streams and pass-through routes give up after ``first_byte_timeout_seconds`` (504), not after
``upstream_timeout_seconds``; a connect failure is 502 on every route (one rule)."""
from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
import pytest

from tests.running_proxy_support import running_proxy

pytestmark = pytest.mark.asyncio
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


class HungBackend:
    """Accepts connections and reads requests; never writes a byte."""

    async def __aenter__(self) -> "HungBackend":
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while await reader.read(65536):
                    pass
            except ConnectionError:
                pass
            writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


class UnreachableBackend:
    """A listening socket that never accepts, its backlog full: a connect's SYN goes unanswered."""

    def __enter__(self) -> "UnreachableBackend":
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        port = self.sock.getsockname()[1]
        self.fillers = []
        for _ in range(2):                     # fill the backlog (the second may time out)
            c = socket.socket()
            c.settimeout(0.3)
            try:
                c.connect(("127.0.0.1", port))
            except OSError:
                pass
            self.fillers.append(c)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        for c in self.fillers:
            c.close()
        self.sock.close()


async def _post(url: str, body: dict) -> tuple[int, dict, float]:
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=body, timeout=aiohttp.ClientTimeout(total=30)) as r:
            return r.status, json.loads(await r.read()), time.monotonic() - t0


async def _get(url: str) -> tuple[int, dict, float]:
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s:
        async with s.get(url, timeout=aiohttp.ClientTimeout(total=30)) as r:
            return r.status, json.loads(await r.read()), time.monotonic() - t0


@pytest.mark.parametrize("relay", ["raw", "aiohttp"])
async def test_hung_backend_stream_gets_504_after_the_first_byte_timeout(relay: str) -> None:
    async with HungBackend() as be, running_proxy(be.url, stream_relay=relay, backend_kind="openai",
                                                  first_byte_timeout_seconds=0.5,
                                                  upstream_timeout_seconds=25) as px:
        status, body, took = await _post(px.url + "/v1/chat/completions", dict(CHAT, stream=True))
        assert status == 504 and body["error"]["code"] == "timeout", body
        assert took < 20                       # well before upstream_timeout_seconds
        status, body, took = await _post(px.url + "/generate_stream", {"inputs": "x"})
        assert status == 504 and body["error_type"] == "upstream", body
        assert took < 20
        status, body, took = await _get(px.url + "/health")       # pass-through
        assert status == 504 and took < 20, body


@pytest.mark.parametrize("relay", ["raw", "aiohttp"])
async def test_connect_timeout_is_502_on_every_route(relay: str) -> None:
    with UnreachableBackend() as be:
        async with running_proxy(be.url, stream_relay=relay, backend_kind="openai",
                                 connect_timeout_seconds=0.3) as px:
            for stream in (False, True):
                status, body, _ = await _post(px.url + "/v1/chat/completions", dict(CHAT, stream=stream))
                assert status == 502 and body["error"]["code"] == "connect", (stream, body)
            status, body, _ = await _post(px.url + "/generate", {"inputs": "x"})
            assert status == 502 and body["error_type"] == "upstream", body
            status, body, _ = await _get(px.url + "/health")
            assert status == 502, body
            status, body, _ = await _get(px.url + "/v1/models")
            assert status == 502, body
