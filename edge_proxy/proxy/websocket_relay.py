"""WebSocket pass-through: a client's ``Upgrade: websocket`` request is relayed to the backend.

The proxy opens the WebSocket to the backend first (with the client's end-to-end headers and
requested subprotocols), so a backend that is down or refuses the upgrade answers the client with
a 502 or the backend's own status, not with a socket that closes at once. Then it accepts the
client's upgrade with the subprotocol the backend chose and copies every message both ways as it
comes: text, binary, ping, pong and close (with its code). Messages are neither parsed nor logged.
"""
from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from yarl import URL

from edge_proxy.proxy.errors import error_response
from edge_proxy.proxy.headers import request_headers

# Set by the WebSocket handshake itself on each hop: never copied from the client.
_HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                        "sec-websocket-protocol", "sec-websocket-accept"})
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def is_websocket_upgrade(request: web.Request) -> bool:
    conn = request.headers.get("Connection", "").lower()
    return (request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"
            and "upgrade" in conn)


async def relay_websocket(request: web.Request, session: aiohttp.ClientSession, backend_url: str) -> web.StreamResponse:
    headers = request_headers(request.headers, request.remote)
    for name in list(headers):
        if name.lower() in _HANDSHAKE:
            del headers[name]
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    try:
        upstream = await session.ws_connect(URL(backend_url + request.path_qs, encoded=True),
                                            headers=headers, protocols=protocols, autoping=False,
                                            autoclose=False, max_msg_size=MAX_MESSAGE_BYTES)
    except aiohttp.WSServerHandshakeError as exc:
        status = exc.status if 400 <= exc.status < 600 else 502
        return error_response("other", status, "upstream_status",
                              f"backend refused the WebSocket upgrade: {exc.status}")
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return error_response("other", 502, "connect", f"backend WebSocket failed: {type(exc).__name__}")
    client = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else (),
                                   autoping=False, autoclose=False, max_msg_size=MAX_MESSAGE_BYTES)
    try:
        await client.prepare(request)
        pumps = [asyncio.ensure_future(_pump(client, upstream)), asyncio.ensure_future(_pump(upstream, client))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
    finally:
        if not upstream.closed:
            await upstream.close()
        if not client.closed:
            await client.close()
    return client


async def _pump(src: Any, dst: Any) -> None:
    """Copy messages from ``src`` to ``dst`` until one side closes (then close the other with the
    same code)."""
    while True:
        msg = await src.receive()
        if msg.type == WSMsgType.TEXT:
            await dst.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await dst.send_bytes(msg.data)
        elif msg.type == WSMsgType.PING:
            await dst.ping(msg.data)
        elif msg.type == WSMsgType.PONG:
            await dst.pong(msg.data)
        elif msg.type == WSMsgType.CLOSE:
            await dst.close(code=msg.data or aiohttp.WSCloseCode.OK, message=(msg.extra or "").encode())
            return
        else:                       # CLOSING, CLOSED, ERROR: the socket is gone
            if not dst.closed:
                await dst.close(code=aiohttp.WSCloseCode.GOING_AWAY)
            return
