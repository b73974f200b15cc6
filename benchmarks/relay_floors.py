"""The two floors that ``proxy_diagnostics.py cpu`` compares the proxy with, each run as a ``--target``:
``tcp-relay`` (bytes copied both ways as they arrive, nothing parsed: the floor for a Python proxy)
and ``aiohttp-relay`` (a bare aiohttp reverse proxy: what the framework alone costs).

Owns: those two relays. Must NOT: measure anything, or import edge_proxy (they are what the proxy is
compared with).
"""
from __future__ import annotations

import argparse
import asyncio
import os

from support import use_uvloop

_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "host", "content-length"}


def cmd_aiohttp_relay(args: argparse.Namespace) -> int:
    """A bare aiohttp reverse proxy: what the framework costs with nothing of ours in it (no JSON
    parsing, no timeline, no metrics, no energy). Request body read whole and sent with one pooled
    aiohttp client session; response chunks written to the client as they arrive."""
    import aiohttp
    from aiohttp import web

    backend = args.backend.rstrip("/")

    async def handler(request: web.Request) -> web.StreamResponse:
        session: aiohttp.ClientSession = request.app["session"]
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with session.request(request.method, backend + request.path_qs, data=body, headers=headers,
                                   allow_redirects=False) as resp:
            out = web.StreamResponse(status=resp.status, headers={
                k: v for k, v in resp.headers.items() if k.lower() not in _HOP})
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                               auto_decompress=False)
        yield
        await app["session"].close()

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handler)
    use_uvloop()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)
    return 0


def cmd_tcp_relay(args: argparse.Namespace) -> int:
    """The floor for a Python proxy on this loop: bytes copied between each client connection and
    its own backend connection as they arrive (uvloop protocols, no HTTP parsing, no accounting)."""
    import socket

    from urllib.parse import urlsplit

    u = urlsplit(args.backend)

    class Half(asyncio.Protocol):
        def __init__(self) -> None:
            self.peer: asyncio.Transport | None = None
            self.transport: asyncio.Transport | None = None
            self.early: list[bytes] = []

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def data_received(self, data: bytes) -> None:
            if self.peer is not None:
                self.peer.write(data)
            else:
                self.early.append(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.peer is not None:
                self.peer.close()

    class Client(Half):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            asyncio.get_running_loop().create_task(self.open())

        async def open(self) -> None:
            loop = asyncio.get_running_loop()
            tr, back = await loop.create_connection(Half, u.hostname, u.port)
            back.peer, self.peer = self.transport, tr
            for d in self.early:
                tr.write(d)
            self.early.clear()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Client, "127.0.0.1", args.port, reuse_port=args.workers > 1)
        async with server:
            await server.serve_forever()

    for _ in range(args.workers - 1):       # more processes on the same port (SO_REUSEPORT)
        if os.fork() == 0:
            break
    use_uvloop()
    asyncio.run(serve())
    return 0
