"""Live economics in a running proxy: cost counters from real token counts, probes kept out of
user statistics, the feedback endpoint, and the five-metric gauges on /metrics.

The backend is the session's real model server (tiny synthetic model); the proxy is the real one
(build_proxy, estimated energy source) on a free port, driven over HTTP. Expected dollars are
computed here from the token counts the client received and the configured price sheet.
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
from prometheus_client.parser import text_string_to_metric_families

from edge_proxy.config import load_settings
from edge_proxy.proxy.server import build_proxy

P_IN, P_OUT = 30.0, 60.0         # USD per 1M tokens
GPU_USD_PER_HOUR = 0.5
TOKEN = "s3cret"


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
async def running_proxy(tmp_path: Path, url: str) -> AsyncIterator[Any]:
    probes = tmp_path / "golden.jsonl"
    probes.write_text(
        json.dumps({"id": "pass", "prompt": "q1", "expected": ".", "checker": "regex", "max_tokens": 3})
        + "\n" + json.dumps({"id": "fail", "prompt": "q2", "expected": "\u2603never", "checker": "exact",
                             "max_tokens": 3})
        + "\n")
    settings = load_settings(environ={}, overrides={
        ("proxy", "backend_url"): url, ("proxy", "port"): 0, ("proxy", "metrics_port"): "none",
        ("proxy", "access_log"): "none", ("proxy", "model_name"): "tiny",
        ("energy", "source"): "estimated",
        ("economics", "api_usd_per_million_input_tokens"): P_IN,
        ("economics", "api_usd_per_million_output_tokens"): P_OUT,
        ("economics", "gpu_usd_per_hour"): GPU_USD_PER_HOUR,
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


def test_costs_probes_feedback_and_gauges(tmp_path: Path, model_server: Any) -> None:
    asyncio.run(_scenario(tmp_path, model_server.url))


async def _scenario(tmp_path: Path, url: str) -> None:
    async with running_proxy(tmp_path, url) as proxy:
        m, usage = await _drive(proxy)
        _check(proxy, m, usage)


async def _drive(proxy: Any) -> tuple[dict, dict[str, Any]]:
    econ = proxy.components["economics"]
    base = proxy.url
    n_user = 4
    async with aiohttp.ClientSession() as s:
        # Two probes complete (one pass, one fail) before user traffic is counted.
        # (the pass/fail series exist from the start at 0: count probes by value, not by series)
        await _wait_for(lambda: sum(v for k, v in _samples(proxy.metrics_text()).items()
                                    if k[0] == "edge_proxy_quality_probes_total") >= 2)
        usage = {"n": n_user, "input": 0, "output": 0}
        ids: list[str] = []        # the proxy's ids (x-edge-request-id): what feedback takes
        for i in range(n_user):
            async with s.post(base + "/v1/completions", headers={"x-request-id": f"user-{i}"},
                              json={"model": "tiny", "prompt": "hi there " * (i + 1), "max_tokens": 5}) as r:
                assert r.status == 200
                ids.append(r.headers["x-edge-request-id"])
                u = (await r.json())["usage"]
                usage["input"] += u["prompt_tokens"]
                usage["output"] += u["completion_tokens"]
        await proxy.drain()
        async with s.get(proxy.settings.proxy.backend_url + "/info") as r:
            usage["weight_bytes"] = (await r.json())["weight_bytes"]
        await _wait_for(lambda: econ.backend_info.get("weight_bytes") == usage["weight_bytes"])

        # Feedback: token required, unknown ids refused, a known id accepted.
        fb = base + "/edge/feedback"
        async with s.post(fb, json={"request_id": ids[0], "score": 0.9}) as r:
            assert r.status == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with s.post(fb, json={"request_id": "nope", "score": 0.9}, headers=auth) as r:
            assert r.status == 404
        async with s.post(fb, json={"request_id": "user-0", "score": 0.9}, headers=auth) as r:
            assert r.status == 404        # the client's own id is a label, never a key
        async with s.post(fb, json={"request_id": ids[0], "score": 7}, headers=auth) as r:
            assert r.status == 400
        async with s.post(fb, json={"request_id": ids[0], "score": 0.9}, headers=auth) as r:
            assert r.status == 200
            assert (await r.json())["model"] == "tiny"
        async with s.post(fb, json={"request_id": ids[0], "score": 0.1}, headers=auth) as r:
            assert r.status == 409        # one score per request
        async with s.get(base + "/metrics") as r:
            text = await r.text()

    return _samples(text), usage


def _check(proxy: Any, m: dict, usage: dict[str, Any]) -> None:
    n_user = usage["n"]
    # Probes went through the proxy (the core counted them) but not into economics.
    core_total = sum(v for (name, _), v in m.items() if name == "edge_proxy_requests_total")
    assert _get(m, "edge_proxy_economics_requests_total", model="tiny") == n_user
    assert core_total >= n_user + 2
    assert _get(m, "edge_proxy_economics_tokens_total", model="tiny", type="input") == usage["input"]
    assert _get(m, "edge_proxy_economics_tokens_total", model="tiny", type="output") == usage["output"]
    api = (usage["input"] * P_IN + usage["output"] * P_OUT) / 1e6
    assert _get(m, "edge_proxy_api_equivalent_cost_usd_total", model="tiny") == pytest.approx(api)
    hw = _get(m, "edge_proxy_hardware_cost_usd_total", model="tiny")
    assert 0 < hw < n_user * 60 / 3600 * GPU_USD_PER_HOUR     # each request took well under a minute
    assert _get(m, "edge_proxy_quality_probes_total", model="tiny", outcome="pass") >= 1
    assert _get(m, "edge_proxy_quality_probes_total", model="tiny", outcome="fail") >= 1
    assert _get(m, "edge_proxy_quality_score_count", model="tiny", source="feedback") == 1
    assert _get(m, "edge_proxy_quality_score_sum", model="tiny", source="feedback") == pytest.approx(0.9)
    assert _get(m, "edge_proxy_quantization_fidelity_percent", model="tiny",
                source="configured") == pytest.approx(87.5)
    assert _get(m, "edge_proxy_model_weight_bytes", model="tiny", backend=proxy.settings.proxy.backend_url,
                source="measured") == usage["weight_bytes"]
    # Energy (estimated source) priced at the default 0.12 USD/kWh, PUE 1.
    joules = _get(m, "edge_proxy_economics_energy_joules_total", model="tiny")
    assert joules > 0
    assert _get(m, "edge_proxy_energy_cost_usd_total", model="tiny") == pytest.approx(joules / 3.6e6 * 0.12)
    # rho_sys: output tokens/s over the window divided by 0.123 GB: positive and finite.
    rho = _get(m, "edge_proxy_system_density_tokens_per_second_per_gigabyte", model="tiny")
    assert rho > 0 and math.isfinite(rho)
    # N_break = 1 USD setup / (API per request - local per request).
    local = (hw + _get(m, "edge_proxy_energy_cost_usd_total", model="tiny")) / n_user
    n_break = _get(m, "edge_proxy_break_even_requests", model="tiny", source="configured")
    margin = api / n_user - local
    assert n_break == (pytest.approx(1.0 / margin, rel=1e-6) if margin > 0 else math.inf)
    assert _get(m, "edge_proxy_break_even_progress_ratio", model="tiny") == pytest.approx(n_user / n_break)


def test_every_economics_input_names_its_source(tmp_path: Path, model_server: Any) -> None:
    """edge_proxy_economics_sources_info: feedback scores are labelled user-submitted feedback (with
    the probes' scores), never "measured"; the energy is the estimated source over the local model
    server's process tree; the weights are measured from /info."""
    async def scenario() -> dict:
        async with running_proxy(tmp_path, model_server.url) as proxy:
            m, _ = await _drive(proxy)
            return m

    m = asyncio.run(scenario())
    (labels,) = [dict(k[1]) for k in m if k[0] == "edge_proxy_economics_sources_info"]
    assert labels == {"model": "tiny", "energy_source": "estimated", "energy_kind": "estimated",
                      "energy_scope": "backend-process-tree", "score_source": "feedback+probe",
                      "weights_source": "measured"}
