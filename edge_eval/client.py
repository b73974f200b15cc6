"""Requests through edge-proxy: one chat completion per item, then its attributed energy.

The proxy answers every instrumented request with ``x-edge-request-id``; the energy of that request
is final a sampling tick after it ends and is read from the proxy's lookup endpoint
``GET /edge/requests/{id}?wait=S`` (metrics port, bearer token; see docs/evaluation.md). Without a
lookup URL and token, joules are recorded as null with source ``none``.

Retries: connection errors, timeouts, 429 and 5xx are retried (``retries`` times, exponential
backoff from 0.5 s); when they are exhausted :class:`EndpointDown` stops the run. Other 4xx answers
are the item's own failure (recorded, the run goes on).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

REQUEST_ID_HEADER = "x-edge-request-id"
MEASURED_SOURCES = {"nvml", "remote"}


class EndpointDown(Exception):
    """The endpoint kept failing after the bounded retries."""


@dataclass
class Reply:
    text: str
    request_id: str | None
    latency_seconds: float
    output_tokens: int | None
    input_tokens: int | None
    status: int
    error: str | None = None


@dataclass
class Energy:
    joules: float | None
    source: str                      # measured | estimated | replay | none
    energy_source: str               # the proxy's source: nvml | remote | replay | estimated | none
    model: str | None = None         # the proxy's model label for the request
    output_tokens: int | None = None


def joules_class(source: str | None) -> str:
    """The proxy's energy source -> the results file's class: measured (nvml, remote),
    estimated, replay (a recorded trace played back), none."""
    if source in MEASURED_SOURCES:
        return "measured"
    if source in ("estimated", "replay"):
        return source
    return "none"


class ProxyClient:
    def __init__(self, endpoint: str, model: str | None, *, lookup_url: str | None,
                 lookup_token: str | None, api_key: str | None = None, retries: int = 3,
                 timeout_seconds: float = 120.0) -> None:
        base = endpoint.rstrip("/")
        self.base = base[:-3] if base.endswith("/v1") else base
        self.model = model
        self.lookup_url = lookup_url.rstrip("/") if lookup_url else None
        self.lookup_token = lookup_token
        self.api_key = api_key
        self.retries = retries
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "ProxyClient":
        self.session = aiohttp.ClientSession(timeout=self.timeout)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.session is not None:
            await self.session.close()

    async def served_model(self) -> str | None:
        """The first model of ``GET /v1/models`` (None when the endpoint does not list any)."""
        assert self.session is not None
        for attempt in range(self.retries + 1):
            try:
                async with self.session.get(self.base + "/v1/models") as r:
                    if r.status == 200:
                        data = await r.json(content_type=None)
                        items = data.get("data") or []
                        return str(items[0]["id"]) if items else None
                    if r.status < 500:
                        return None
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.5 * 2 ** attempt)
        raise EndpointDown(f"{self.base}/v1/models did not answer after {self.retries} retries")

    async def chat(self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float,
                   seed: int | None) -> Reply:
        assert self.session is not None
        body: dict[str, Any] = {"model": self.model or "default", "messages": messages,
                                "max_tokens": max_tokens, "temperature": temperature}
        if seed is not None:
            body["seed"] = seed
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        last = ""
        for attempt in range(self.retries + 1):
            t0 = time.monotonic()
            try:
                async with self.session.post(self.base + "/v1/chat/completions", json=body,
                                             headers=headers) as r:
                    data = await r.json(content_type=None)
                    latency = time.monotonic() - t0
                    rid = r.headers.get(REQUEST_ID_HEADER)
                    if r.status == 200:
                        usage = data.get("usage") or {}
                        return Reply(text=str(data["choices"][0]["message"].get("content") or ""),
                                     request_id=rid, latency_seconds=latency,
                                     output_tokens=usage.get("completion_tokens"),
                                     input_tokens=usage.get("prompt_tokens"), status=200)
                    last = f"HTTP {r.status}"
                    if r.status != 429 and r.status < 500:
                        msg = (data.get("error") or {}).get("message") if isinstance(data, dict) else None
                        return Reply("", rid, latency, None, None, r.status,
                                     error=f"HTTP {r.status}: {str(msg)[:200]}")
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, IndexError) as exc:
                last = type(exc).__name__ + (f": {exc}" if str(exc) else "")
            if attempt < self.retries:
                await asyncio.sleep(0.5 * 2 ** attempt)
        raise EndpointDown(f"{self.base}: {last[:200]} after {self.retries} retries")

    async def energy(self, request_id: str | None, wait_seconds: float = 10.0) -> Energy:
        """The request's final full-attribution joules from the proxy's lookup endpoint."""
        if not (self.lookup_url and self.lookup_token and request_id):
            return Energy(None, "none", "none")
        assert self.session is not None
        url = f"{self.lookup_url}/edge/requests/{request_id}"
        for attempt in range(self.retries + 1):
            try:
                async with self.session.get(url, params={"wait": str(wait_seconds)}, headers={
                        "Authorization": f"Bearer {self.lookup_token}"}) as r:
                    if r.status == 200:
                        data = await r.json(content_type=None)
                        e = data.get("energy") or {}
                        src = str(e.get("source") or "none")
                        joules = e.get("full_joules") if data.get("final") else None
                        return Energy(None if joules is None else float(joules),
                                      joules_class(src) if joules is not None else "none", src,
                                      data.get("model"), data.get("output_tokens"))
                    if r.status in (401, 404):
                        return Energy(None, "none", "none")
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                pass
            await asyncio.sleep(0.5 * 2 ** attempt)
        return Energy(None, "none", "none")
