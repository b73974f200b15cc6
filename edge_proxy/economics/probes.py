"""Quality probes: golden prompts sent through the proxy itself, checked, scored 1 or 0.

Owns the probe schedule, the probe requests (marked ``x-edge-traffic: probe`` and a random
``x-request-id`` so the proxy keeps them out of user statistics), where they are sent (the proxy's
own URL, :func:`proxy_url`) and the model they ask for when a golden prompt names none
(:func:`probe_model`), and their outcome counts. Must not keep scores itself (``record_score`` does)
nor decide how a completion is checked (:class:`~.quality.GoldenPrompt` does).
"""
from __future__ import annotations

import asyncio
import uuid
from typing import Any, Callable

from aiohttp import ClientSession, ClientTimeout
from prometheus_client import Counter

from edge_proxy.config import Settings
from edge_proxy.economics.quality import GoldenPrompt

PROBE_HEADER = "x-edge-traffic"          # value "probe": the proxy labels the request traffic=probe


def proxy_url(runtime: Any, settings: Settings) -> str:
    """The proxy's own URL (the running one's bound port when known); a wildcard host means loopback.

    ``runtime``: the running ``edge_proxy.proxy.server.ProxyRuntime`` (None before one is set)."""
    live = runtime is not None and bool(getattr(runtime, "port", None))
    host = runtime.settings.proxy.host if live else settings.proxy.host
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{host}:{runtime.port if live else settings.proxy.port}"


def probe_model(runtime: Any, backend_info: dict[str, Any]) -> str:
    """The model a probe asks for when its golden prompt names none: the backend's, else the ``model_id``
    of its last ``/info`` answer, else ``default``."""
    backend_model = getattr(getattr(runtime, "backend", None), "model", None)
    return backend_model or str(backend_info.get("model_id") or "default")


class ProbeRunner:
    """``target()``: the proxy's base URL; ``model()``: the model name to ask for when a golden
    prompt names none; ``label``: the proxy's model label for probes (``proxy.model_name``)."""

    def __init__(self, golden: list[GoldenPrompt], target: Callable[[], str],
                 model: Callable[[], str], label: str | None, outcomes: Counter,
                 record_score: Callable[[str, float, str], None]) -> None:
        self.golden = golden
        self.target = target
        self.model = model
        self.label = label
        self.outcomes = outcomes
        self.record_score = record_score
        self.in_flight: dict[str, str] = {}      # request ids of probes in flight -> model label

    def claim(self, request_id: str | None, model: str) -> bool:
        """True when ``request_id`` is one of our probes (the proxy's model label is noted)."""
        if request_id is None or request_id not in self.in_flight:
            return False
        self.in_flight[request_id] = model
        return True

    async def run_probe(self, session: ClientSession, g: GoldenPrompt) -> bool | None:
        """Send one golden prompt through the proxy; record a 1/0 score. None on error."""
        model = g.model or self.model()
        body = {"model": model, "prompt": g.prompt, "max_tokens": g.max_tokens,
                "temperature": 0.0}
        rid = f"probe-{uuid.uuid4().hex}"
        headers = {PROBE_HEADER: "probe", "x-request-id": rid}
        self.in_flight[rid] = self.label or model
        try:
            async with session.post(self.target() + "/v1/completions", json=body,
                                    headers=headers) as resp:
                data = await resp.json(content_type=None)
                if resp.status != 200:
                    raise RuntimeError(f"status {resp.status}")
            text = data["choices"][0]["text"]
        except Exception:
            self.outcomes.labels(self.in_flight.pop(rid, model), "error").inc()
            return None
        label = self.in_flight.pop(rid, model)    # the label the proxy gave the request
        ok = g.check(text)
        self.outcomes.labels(label, "pass" if ok else "fail").inc()
        self.record_score(label, 1.0 if ok else 0.0, "probe")
        return ok

    async def run(self, interval: Callable[[], float], timeout_seconds: float) -> None:
        """Probe forever, one golden prompt every ``interval()`` seconds, in turn."""
        i = 0
        async with ClientSession(timeout=ClientTimeout(total=timeout_seconds)) as session:
            await asyncio.sleep(min(interval(), 1.0))
            while True:
                await self.run_probe(session, self.golden[i % len(self.golden)])
                i += 1
                await asyncio.sleep(interval())
