"""Readiness probe of a backend: is it listening, is it ready, and what does its ``/info`` say.

Ready means ``GET /health`` answers 200 and, for backends whose ``/info`` has a ``ready`` field
(our model server), ``ready`` is true. A backend without ``/health`` (404) counts as ready when
``GET /v1/models`` answers 200 (plain OpenAI-compatible servers). Listening means any HTTP answer.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from edge_proxy.coldstart.clock import ClockPair


@dataclass
class ProbeResult:
    listening: bool = False
    ready: bool = False
    health_status: int | None = None
    info: dict[str, Any] | None = None     # parsed /info JSON (our model server, TGI)
    clock: ClockPair | None = None          # clock reading taken when /info answered
    error: str | None = None                # connect | timeout | http | None
    t_ns: int = 0                           # monotonic time the probe finished
    extra: dict[str, Any] = field(default_factory=dict)


class ReadinessProbe:
    """Polls one backend base URL. Owns one aiohttp session (create in a running loop)."""

    def __init__(self, base_url: str, timeout_seconds: float = 2.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds, connect=min(1.0, timeout_seconds))
        self._session: aiohttp.ClientSession | None = None
        self._has_info: bool | None = None   # None: unknown; False: /info is 404 (not our server)

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # A fresh connection each probe: a pooled connection to a dead process is worthless.
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, connector=aiohttp.TCPConnector(force_close=True)
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def check(self) -> ProbeResult:
        res = ProbeResult()
        sess = self._sess()
        try:
            async with sess.get(f"{self.base_url}/health") as r:
                res.listening = True
                res.health_status = r.status
                await r.read()
            health_ok = res.health_status == 200
            if res.health_status == 404:
                async with sess.get(f"{self.base_url}/v1/models") as r:
                    await r.read()
                    health_ok = r.status == 200
            if self._has_info is not False:
                async with sess.get(f"{self.base_url}/info") as r:
                    body = await r.read()
                    res.clock = ClockPair.now()
                    if r.status == 404:
                        self._has_info = False
                    elif r.status == 200:
                        self._has_info = True
                        try:
                            data = json.loads(body)
                            res.info = data if isinstance(data, dict) else None
                        except ValueError:
                            res.info = None
            ready_flag = True
            if res.info is not None and "ready" in res.info:
                ready_flag = bool(res.info.get("ready"))
            res.ready = health_ok and ready_flag
        except (aiohttp.ClientConnectorError, ConnectionRefusedError, aiohttp.ServerDisconnectedError,
                aiohttp.ClientOSError):
            res.error = "connect"
        except asyncio.TimeoutError:
            res.error = "timeout"
        except aiohttp.ClientError:
            res.error = "http"
        res.t_ns = time.monotonic_ns()
        return res
