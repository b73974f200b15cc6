"""Live economics in a running proxy: cost counters from real token counts, probes kept out of
user statistics, the feedback endpoint, and the five-metric gauges on /metrics.

The backend is a small aiohttp OpenAI-compatible upstream in this file (it returns fixed usage
counts, so the expected dollars are computed here from the price sheet, not by the code under
test). The proxy is the real one (build_proxy) on a free port, driven over HTTP.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from edge_proxy.config import load_settings
from edge_proxy.server import build_proxy

PROMPT_TOKENS = 7
COMPLETION_TOKENS = 5
ANSWER = " the answer is 42"
WEIGHT_BYTES = 123_000_000
P_IN, P_OUT = 3.0, 15.0          # USD per 1M tokens
TOKEN = "s3cret"


async def _upstream() -> tuple[web.AppRunner, str]:
    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({
            "id": "cmpl-1", "object": "text_completion", "model": body.get("model", "tiny"),
            "choices": [{"index": 0, "text": ANSWER, "finish_reason": "length"}],
            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
                      "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS}})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "tiny", "object": "model"}]})

    async def info(request: web.Request) -> web.Response:
        return web.json_response({"model_id": "tiny", "weight_bytes": WEIGHT_BYTES,
                                  "state": "ready", "ready": True, "engine": "fake"})

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/info", info)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _get(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def _wait_for(pred: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_proxy(tmp_path: Path) -> AsyncIterator[Any]:
    runner, url = await _upstream()
    probes = tmp_path / "golden.jsonl"
    probes.write_text(
        json.dumps({"id": "pass", "prompt": "q1", "expected": "answer is 4\\d", "checker": "regex"})
        + "\n" + json.dumps({"id": "fail", "prompt": "q2", "expected": "Paris", "checker": "contains"})
        + "\n")
    settings = load_settings(environ={}, overrides={
        ("proxy", "backend_url"): url, ("proxy", "port"): 0, ("proxy", "metrics_port"): "none",
        ("proxy", "access_log"): "none",
        ("economics", "api_usd_per_million_input_tokens"): P_IN,
        ("economics", "api_usd_per_million_output_tokens"): P_OUT,
        ("economics", "gpu_usd_per_hour"): 2.0,
        ("economics", "setup_usd"): 1.0,
        ("economics", "feedback_token"): TOKEN,
        ("economics", "scores"): {"tiny": 0.7},
        ("economics", "reference_scores"): {"tiny": 0.8},
        ("economics", "probes_path"): str(probes),
        ("economics", "probe_interval_seconds"): 0.05,
        ("economics", "info_poll_seconds"): 0.2,
    })
    rt = build_proxy(settings)
    await rt.start()
    try:
        yield rt
    finally:
        await rt.stop()
        await runner.cleanup()


def test_costs_probes_feedback_and_gauges(tmp_path: Path) -> None:
    asyncio.run(_scenario(tmp_path))


async def _scenario(tmp_path: Path) -> None:
    async with running_proxy(tmp_path) as proxy:
        m, n_user = await _drive(proxy)
        _check(proxy, m, n_user)


async def _drive(proxy: Any) -> tuple[dict, int]:
    econ = proxy.components["economics"]
    base = proxy.url
    n_user = 4
    async with aiohttp.ClientSession() as s:
        # Two probes complete (one pass, one fail) before user traffic is counted.
        await _wait_for(lambda: sum(1 for k in _samples(proxy.metrics_text())
                                    if k[0] == "edge_proxy_quality_probes_total") >= 2)
        for i in range(n_user):
            async with s.post(base + "/v1/completions", headers={"x-request-id": f"user-{i}"},
                              json={"model": "tiny", "prompt": "hi", "max_tokens": 5}) as r:
                assert r.status == 200
                assert (await r.json())["choices"][0]["text"] == ANSWER
        await proxy.drain()
        await _wait_for(lambda: econ.backend_info.get("weight_bytes") == WEIGHT_BYTES)

        # Feedback: token required, unknown ids refused, a known id accepted.
        fb = base + "/edge/feedback"
        async with s.post(fb, json={"request_id": "user-0", "score": 0.9}) as r:
            assert r.status == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with s.post(fb, json={"request_id": "nope", "score": 0.9}, headers=auth) as r:
            assert r.status == 404
        async with s.post(fb, json={"request_id": "user-0", "score": 7}, headers=auth) as r:
            assert r.status == 400
        async with s.post(fb, json={"request_id": "user-0", "score": 0.9}, headers=auth) as r:
            assert r.status == 200
            assert (await r.json())["model"] == "tiny"
        async with s.get(base + "/metrics") as r:
            text = await r.text()

    return _samples(text), n_user


def _check(proxy: Any, m: dict, n_user: int) -> None:
    # Probes went through the proxy (the core counted them) but not into economics.
    core_total = sum(v for (name, _), v in m.items() if name == "edge_proxy_requests_total")
    assert _get(m, "edge_proxy_economics_requests_total", model="tiny") == n_user
    assert core_total >= n_user + 2
    assert _get(m, "edge_proxy_economics_tokens_total", model="tiny", type="input") == n_user * PROMPT_TOKENS
    assert _get(m, "edge_proxy_economics_tokens_total", model="tiny", type="output") == n_user * COMPLETION_TOKENS
    api = n_user * (PROMPT_TOKENS * P_IN + COMPLETION_TOKENS * P_OUT) / 1e6
    assert _get(m, "edge_proxy_api_equivalent_cost_usd_total", model="tiny") == pytest.approx(api)
    hw = _get(m, "edge_proxy_hardware_cost_usd_total", model="tiny")
    assert 0 < hw < n_user * 60 / 3600 * 2.0          # each request took well under a minute
    assert _get(m, "edge_proxy_quality_probes_total", model="tiny", outcome="pass") >= 1
    assert _get(m, "edge_proxy_quality_probes_total", model="tiny", outcome="fail") >= 1
    assert _get(m, "edge_proxy_quality_score_count", model="tiny", source="feedback") == 1
    assert _get(m, "edge_proxy_quality_score_sum", model="tiny", source="feedback") == pytest.approx(0.9)
    assert _get(m, "edge_proxy_quantization_fidelity_percent", model="tiny") == pytest.approx(87.5)
    assert _get(m, "edge_proxy_model_weight_bytes", model="tiny", backend=proxy.settings.proxy.backend_url,
                source="measured") == WEIGHT_BYTES
    # rho_sys: output tokens/s over the window divided by 0.123 GB: positive and finite.
    rho = _get(m, "edge_proxy_system_density_tokens_per_second_per_gigabyte", model="tiny")
    assert rho > 0 and math.isfinite(rho)
    # N_break = 1 USD setup / (API per request - local per request).
    local = (hw + _get(m, "edge_proxy_energy_cost_usd_total", model="tiny")) / n_user
    n_break = _get(m, "edge_proxy_break_even_requests", model="tiny")
    assert n_break == pytest.approx(1.0 / (api / n_user - local), rel=1e-6)
    assert _get(m, "edge_proxy_break_even_progress_ratio", model="tiny") == pytest.approx(n_user / n_break)
