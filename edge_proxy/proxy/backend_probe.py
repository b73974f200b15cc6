"""Learn the backend's kind and served model (``--backend-kind auto``) from ``/info`` and ``/v1/models``.

- ``/info`` answering JSON with ``model_id``: TGI, or our model server when it also reports
  ``engine``/``state``.
- ``/v1/models`` answering ``{"data": [{"id": ...}]}``: an OpenAI-compatible server (vLLM, ...).
The probe retries until the backend answers, then refreshes every minute. Failures are silent here:
requests report them. Owns :class:`BackendInfo` (what the proxy knows about its backend). Must
not: forward requests.
"""
from __future__ import annotations

import asyncio
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any, TYPE_CHECKING

import aiohttp

if TYPE_CHECKING:
    from edge_proxy.proxy.app import BackendInfo, ProxyCore
    from edge_proxy.telemetry.metrics import ProxyMetrics

log = logging.getLogger("edge_proxy")
RETRY_SECONDS = 1.0
REFRESH_SECONDS = 60.0


@dataclass
class BackendInfo:
    """What the proxy knows about its backend (probed at startup, refreshed lazily)."""

    url: str
    kind: str = "unknown"              # model_server | tgi | openai | unknown
    model: str | None = None           # served model id (bounded label)
    models: set[str] = field(default_factory=set)
    info: dict[str, Any] | None = None


def _model_name(model_id: str) -> str:
    # A local directory as model id: keep its last component (bounded, readable label).
    return posixpath.basename(model_id.rstrip("/")) if model_id.startswith("/") else model_id


async def _get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
        if resp.status != 200:
            return None
        try:
            return await resp.json(content_type=None)
        except ValueError:
            return None


async def probe_once(session: aiohttp.ClientSession, backend: BackendInfo, configured_kind: str) -> bool:
    """One probe; returns True when something was learned."""
    learned = False
    kind: str | None = None
    try:
        info = await _get_json(session, backend.url + "/info")
    except (aiohttp.ClientError, asyncio.TimeoutError):
        info = None
    if isinstance(info, dict) and isinstance(info.get("model_id"), str):
        backend.info = info
        backend.model = _model_name(info["model_id"])
        kind = "model_server" if ("engine" in info or "state" in info) else "tgi"
        learned = True
    try:
        models = await _get_json(session, backend.url + "/v1/models")
    except (aiohttp.ClientError, asyncio.TimeoutError):
        models = None
    if isinstance(models, dict) and isinstance(models.get("data"), list):
        ids = [m.get("id") for m in models["data"] if isinstance(m, dict) and isinstance(m.get("id"), str)]
        backend.models = set(ids[:64])
        if ids and backend.model is None:
            backend.model = ids[0]
        kind = kind or "openai"
        learned = True
    if configured_kind == "auto" and kind is not None:
        backend.kind = kind
    return learned


def unmatched_model_keys(settings: Any, backend: BackendInfo) -> list[str]:
    """Warnings for per-model configuration keys that match no model label this proxy will use
    (the configured ``proxy.model_name``, else the models the backend serves): such a key is never
    read, and the real series get no value from it (e.g. NaN intelligence per joule)."""
    names = {settings.proxy.model_name} if settings.proxy.model_name else (
        set(backend.models) | ({backend.model} if backend.model else set()))
    if not names:
        return []
    out = []
    eco = settings.economics
    for key in ("scores", "reference_scores", "model_gigabytes", "paper_model_sizes"):
        for model in sorted(getattr(eco, key, None) or {}):
            if model not in names:
                out.append(f"economics.{key} has model {model!r}, but requests are labelled "
                           f"{', '.join(repr(n) for n in sorted(names))}: that entry is never used "
                           "(rename it, or set proxy.model_name)")
    return out


async def probe_loop(session: aiohttp.ClientSession, backend: BackendInfo, settings: Any,
                     metrics: "ProxyMetrics") -> None:
    """Probe until cancelled: every :data:`RETRY_SECONDS` until the backend answers, then every
    :data:`REFRESH_SECONDS`."""
    configured_kind = settings.proxy.backend_kind
    warned = False
    while True:
        ok = await probe_once(session, backend, configured_kind)
        metrics.backend_kind = backend.kind
        if ok and not warned:
            warned = True
            for line in unmatched_model_keys(settings, backend):
                log.warning("%s", line)
        await asyncio.sleep(REFRESH_SECONDS if ok else RETRY_SECONDS)
