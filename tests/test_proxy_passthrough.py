"""Proxy against a real (small, in-process) aiohttp upstream: what is not a generation call passes through
untouched (other methods and paths, metadata routes, large and chunked bodies, websockets, hop-by-hop headers
dropped), every instrumented response carries a request id, and the relay's pooled connections are not reused
past the idle limit."""
from __future__ import annotations

import json

import aiohttp
import pytest

from tests.proxy_support import InProcessUpstream, metric_value
from tests.running_proxy_support import running_proxy

pytestmark = pytest.mark.asyncio


async def _get(url: str) -> bytes:
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            return await r.read()


async def test_passthrough_untouched_and_hop_by_hop():
    async with InProcessUpstream() as up, running_proxy(up.url, forward_routes="*") as px:
        async with aiohttp.ClientSession() as s:
            async with s.put(px.url + "/echo/x?y=1", data=b"\x00raw bytes",
                             headers={"Connection": "keep-alive, X-Private", "X-Private": "secret",
                                      "Keep-Alive": "timeout=5", "X-End": "kept"}) as r:
                assert r.status == 200
                assert await r.read() == b"\x00raw bytes"
                assert r.headers["x-echo-path"] == "/echo/x?y=1"
        sent = {k.lower(): v for k, v in up.state.requests[-1]["headers"].items()}
        assert sent["x-end"] == "kept"
        assert "x-private" not in sent and "keep-alive" not in sent
        assert "127.0.0.1" in sent["x-forwarded-for"]
        await px.drain()
        assert px.components["recorder"].final == []      # not an instrumented route


async def test_metadata_routes_forwarded():
    async with InProcessUpstream() as up, running_proxy(up.url, forward_routes="*") as px:
        direct = json.loads(await _get(up.url + "/info"))
        assert json.loads(await _get(px.url + "/info")) == direct
        text = (await _get(px.metrics_url)).decode()
        assert metric_value(text, "edge_proxy_requests_total", route="/info", status="200") == 1


async def test_other_methods_and_paths_on_instrumented_prefixes_pass_through():
    async with InProcessUpstream() as up, running_proxy(up.url, forward_routes="*") as px:
        async with aiohttp.ClientSession() as s:
            async with s.get(px.url + "/v1/chat/completions") as r:
                direct_status = r.status
            async with s.get(up.url + "/v1/chat/completions") as r:
                assert r.status == direct_status == 405
            async with s.post(px.url + "/echo/v1/completions", data=b"x") as r:
                assert r.status == 200 and await r.read() == b"x"
        await px.drain()
        assert px.components["recorder"].final == []


async def test_request_id_on_every_instrumented_response():
    """x-edge-request-id (the id /edge/feedback takes) is always the proxy's own; the client's
    x-request-id is forwarded and echoed, never used as the id; without one the backend receives
    the proxy's id as x-request-id."""
    async with InProcessUpstream() as up, running_proxy(up.url) as px:
        def sent_id() -> str:
            return {k.lower(): v for k, v in up.state.requests[-1]["headers"].items()}["x-request-id"]

        url = px.url + "/v1/chat/completions"
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "a b"}], "max_tokens": 3}
        async with aiohttp.ClientSession() as s:
            for stream in (False, True):
                async with s.post(url, json=dict(body, stream=stream)) as r:
                    assert r.status == 200
                    await r.read()
                    rid = r.headers["x-edge-request-id"]
                assert len(rid) == 32 and int(rid, 16) >= 0
                assert sent_id() == rid
                async with s.post(url, json=dict(body, stream=stream),
                                  headers={"x-request-id": f"mine-{stream}"}) as r:
                    await r.read()
                    own = r.headers["x-edge-request-id"]
                    assert len(own) == 32 and own != rid and "mine" not in own
                    assert r.headers["x-request-id"] == f"mine-{stream}"     # echoed
                assert sent_id() == f"mine-{stream}"
            async with s.post(url, data=b"{not json") as r:
                assert r.status == 400
                bad_id = r.headers["x-edge-request-id"]
            async with s.post(url, json=body, headers={"x-fake-fault": "500"}) as r:
                assert r.status == 500
                assert r.headers["x-edge-request-id"] != bad_id
        await px.drain()
        # (the 400 never reached the backend: only the core outputs saw it)
        ids = [rec.request_id for rec in px.components["recorder"].final]
        assert len(ids) == len(set(ids)) == 5
        assert bad_id not in ids


async def test_relay_does_not_reuse_a_connection_idle_past_the_limit(monkeypatch):
    import asyncio

    import edge_proxy.proxy.raw_pool as relay

    async with InProcessUpstream() as up, running_proxy(up.url) as px:
        body = {"model": "fake-model", "prompt": "a", "max_tokens": 1}
        async with aiohttp.ClientSession() as s:
            async def one() -> None:
                async with s.post(px.url + "/v1/completions", json=body) as r:
                    assert r.status == 200
                    await r.read()
            await one()
            await one()              # right away: the same backend connection
            monkeypatch.setattr(relay, "MAX_IDLE_REUSE_SECONDS", 0.2)
            await asyncio.sleep(0.3)
            await one()              # idle past the limit: a new connection
        peers = [r["peer"] for r in up.state.requests]
        assert peers[0] == peers[1]
        assert peers[2] != peers[1]


async def test_passthrough_streams_large_and_chunked_bodies():
    """Pass-through routes forward request bodies as they arrive, beyond the 4 MiB limit that
    applies to the generation bodies the proxy parses: with the client's Content-Length, or
    chunked when the client sent it chunked."""
    import hashlib
    import os

    big = os.urandom(10 * 1024 * 1024)
    async with InProcessUpstream() as up, running_proxy(up.url, forward_routes="*") as px:
        async with aiohttp.ClientSession() as s:
            async with s.put(px.url + "/echo/upload", data=big) as r:
                assert r.status == 200
                got = await r.read()
            assert hashlib.sha256(got).digest() == hashlib.sha256(big).digest()
            sent = {k.lower(): v for k, v in up.state.requests[-1]["headers"].items()}
            assert sent["content-length"] == str(len(big)) and "transfer-encoding" not in sent

            async def parts():
                for i in range(0, len(big), 1 << 20):
                    yield big[i:i + (1 << 20)]

            async with s.post(px.url + "/echo/chunked", data=parts()) as r:
                assert r.status == 200
                assert await r.read() == big
            sent = {k.lower(): v for k, v in up.state.requests[-1]["headers"].items()}
            assert sent.get("transfer-encoding") == "chunked" and "content-length" not in sent

            async with s.get(px.url + "/echo/empty") as r:        # no body at all
                assert r.status == 200 and await r.read() == b""
            sent = {k.lower(): v for k, v in up.state.requests[-1]["headers"].items()}
            assert "transfer-encoding" not in sent and sent.get("content-length", "0") == "0"


async def test_websocket_passes_through():
    """A WebSocket upgrade on a pass-through path reaches the backend: messages both ways,
    the subprotocol the backend chose, end-to-end headers, and the backend's close code."""
    import os

    async with InProcessUpstream() as up, running_proxy(up.url, forward_routes="*") as px:
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(px.url + "/ws", protocols=("a", "b"),
                                    headers={"Authorization": "Bearer t0k"}) as ws:
                assert ws.protocol == "b"
                await ws.send_str("hello")
                assert (await ws.receive_str(timeout=5)) == "echo:hello"
                blob = os.urandom(200_000)
                await ws.send_bytes(blob)
                assert (await ws.receive_bytes(timeout=5)) == blob[::-1]
                await ws.send_str("close-me")
                msg = await ws.receive(timeout=5)
                assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4001
            sent = {k.lower(): v for k, v in up.state.requests[-1]["headers"].items()}
            assert sent["authorization"] == "Bearer t0k"
            assert up.state.requests[-1]["path"] == "/ws"

            # the client closes: the backend side ends too, and the proxy takes more upgrades
            async with s.ws_connect(px.url + "/ws") as ws:
                await ws.send_str("x")
                assert (await ws.receive_str(timeout=5)) == "echo:x"
            async with s.ws_connect(px.url + "/ws") as ws:
                await ws.send_str("y")
                assert (await ws.receive_str(timeout=5)) == "echo:y"

            # a path that is not a WebSocket on the backend: the upgrade fails with an HTTP error
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await s.ws_connect(px.url + "/v1/models")
            assert err.value.status >= 400


async def test_websocket_to_a_backend_that_is_down_is_a_502():
    from tests.net_support import free_port

    async with running_proxy(f"http://127.0.0.1:{free_port()}", forward_routes="*") as px:
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await s.ws_connect(px.url + "/ws")
            assert err.value.status == 502
