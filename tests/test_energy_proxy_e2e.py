"""The proxy end to end with the replay energy source: real proxy, real tiny model server, real
clients (openai, text_generation), concurrent streaming and non-streaming requests; the Prometheus
totals must conserve energy and every request must carry its attribution."""
from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import openai
import pytest
from text_generation import AsyncClient

from edge_proxy.config import load_settings
from edge_proxy.proxy.hooks import BaseObserver, RequestRecord
from edge_proxy.proxy.server import build_proxy

TRACE = Path(__file__).parent / "data" / "energy_h100_synthetic.jsonl"

pytestmark = pytest.mark.asyncio


class Finals(BaseObserver):
    def __init__(self) -> None:
        self.records: list[RequestRecord] = []

    def on_request_final(self, rec: RequestRecord) -> None:
        self.records.append(rec)


def samples(text: str, name: str) -> list[tuple[dict, float]]:
    from prometheus_client.parser import text_string_to_metric_families
    return [(s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == name]


def total(text: str, name: str) -> float:
    return sum(v for _, v in samples(text, name))


async def test_proxy_with_replay_source_conserves_energy(model_server):
    settings = load_settings(None, {
        ("proxy", "backend_url"): model_server.url, ("proxy", "port"): 0, ("proxy", "metrics_port"): 0,
        ("proxy", "access_log"): "none", ("energy", "source"): "replay",
        ("energy", "replay_path"): str(TRACE), ("energy", "period_seconds"): 0.05,
        ("energy", "response_header"): True,
        ("energy", "idle_watts"): 50.0}, environ={})   # below the trace's idle draw: active > 0 whatever its phase
    runtime = build_proxy(settings)
    finals = Finals()
    runtime.observers.append(finals)
    await runtime.start()
    try:
        client = openai.AsyncOpenAI(base_url=runtime.url + "/v1", api_key="x", max_retries=0)
        model = (await client.models.list()).data[0].id
        tgi = AsyncClient(runtime.url, timeout=120)

        async def chat_stream(i: int) -> int:
            n = 0
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"hello number {i}"}], max_tokens=8,
                stream=True, extra_body={"ignore_eos": True})
            async for chunk in stream:
                n += sum(1 for c in chunk.choices if c.delta.content)
            return n

        headers: list[str] = []
        phases: list[tuple[str, str]] = []

        async def completion(i: int) -> int:
            raw = await client.completions.with_raw_response.create(
                model=model, prompt=f"count {i}", max_tokens=6, extra_body={"ignore_eos": True})
            headers.append(raw.headers.get("x-edge-energy-joules"))
            phases.append((raw.headers.get("x-edge-energy-prefill-joules"),
                           raw.headers.get("x-edge-energy-decode-joules")))
            return raw.parse().usage.completion_tokens

        async def tgi_stream() -> int:
            return len([r async for r in tgi.generate_stream("tgi says", max_new_tokens=6)])

        async def one_round() -> list[int]:
            return await asyncio.gather(*(chat_stream(i) for i in range(3)), completion(0), completion(1),
                                        tgi_stream())

        counts = await one_round()
        await asyncio.sleep(0.3)             # idle ticks between the rounds
        counts += await one_round()
        assert all(c > 0 for c in counts)
        assert len(headers) == 4 and all(h is not None and float(h) >= 0 for h in headers)   # provisional J
        for h, (pre, dec) in zip(headers, phases):         # the phase split adds up to the full joules
            assert pre is not None and dec is not None
            assert float(pre) >= 0 and float(dec) >= 0
            assert float(pre) + float(dec) == pytest.approx(float(h), abs=0.0015)
        await runtime.drain()
        await client.close()

        recs = [r for r in finals.records if r.outcome == "ok"]
        assert len(recs) == 12
        for r in recs:
            assert r.energy is not None and r.energy.source == "replay"
            assert r.energy.full_joules >= r.energy.active_joules >= 0.0
            e = r.energy                                   # prefill + decode = full (streams by ticks)
            assert e.prefill_joules is not None and e.decode_joules is not None
            assert e.prefill_joules + e.decode_joules == pytest.approx(e.full_joules, rel=1e-9, abs=1e-12)
            assert r.energy.attribution == ("token-weighted" if r.stream else "time-weighted")
        final = [r for r in recs if not r.energy.provisional]
        assert final, "no request's energy became final"
        assert sum(r.energy.full_joules for r in final) > 0

        async with aiohttp.ClientSession() as s:
            async with s.get(runtime.metrics_url) as resp:
                text = await resp.text()
        measured = total(text, "edge_proxy_gpu_energy_joules_total")
        attributed = total(text, "edge_proxy_attributed_energy_joules_total")
        idle = total(text, "edge_proxy_idle_energy_joules_total")
        pending = total(text, "edge_proxy_energy_unapportioned_joules")
        assert measured > 0
        assert attributed + idle + pending == pytest.approx(measured, rel=1e-9)
        assert attributed > 0
        assert {lbl["source"] for lbl, _ in samples(text, "edge_proxy_gpu_energy_joules_total")} == {"replay"}
        assert len(samples(text, "edge_proxy_gpu_energy_joules_total")) == 2          # both GPUs of the trace
        full_total = total(text, "edge_proxy_attributed_full_energy_joules_total")
        assert attributed <= full_total + 1e-9 <= attributed + idle + 1e-9
        assert sum(r.energy.full_joules for r in final) <= full_total + 1e-6
        assert total(text, "edge_proxy_request_energy_joules_count") == 12
        assert total(text, "edge_proxy_energy_source_info") == 1
    finally:
        await runtime.stop()
    comp = runtime.components["energy"]
    assert not comp.sampler.running
    tot = comp.ledger.snapshot()                   # after stop: everything split
    assert tot.pending_joules == pytest.approx(0.0, abs=1e-9)
    assert tot.active_joules + tot.idle_joules == pytest.approx(tot.measured_joules, rel=1e-9)


async def test_remote_source_without_gpu_never_fails_a_request(model_server):
    """`--energy-source remote` against a model server that has no GPU (its /energy says source
    "none"): requests are served as usual and carry a provisional, zero attribution."""
    settings = load_settings(None, {
        ("proxy", "backend_url"): model_server.url, ("proxy", "port"): 0, ("proxy", "metrics_port"): None,
        ("proxy", "access_log"): "none", ("energy", "source"): "remote"}, environ={})
    runtime = build_proxy(settings)
    finals = Finals()
    runtime.observers.append(finals)
    await runtime.start()
    try:
        client = openai.AsyncOpenAI(base_url=runtime.url + "/v1", api_key="x", max_retries=0)
        model = (await client.models.list()).data[0].id
        r = await client.completions.create(model=model, prompt="hi", max_tokens=3)
        assert r.usage.completion_tokens >= 1
        chunks = [c async for c in await client.completions.create(model=model, prompt="hi", max_tokens=3,
                                                                    stream=True)]
        assert chunks
        await client.close()
        await runtime.drain()
        assert len(finals.records) == 2
        for rec in finals.records:
            assert rec.outcome == "ok" and rec.status == 200
            assert rec.energy is not None and rec.energy.source == "remote" and rec.energy.provisional
            assert rec.energy.full_joules == 0.0
        async with aiohttp.ClientSession() as s:
            async with s.get(runtime.metrics_url) as resp:
                text = await resp.text()
        assert total(text, "edge_proxy_energy_sampler_errors_total") >= 1
        assert total(text, "edge_proxy_gpu_energy_joules_total") == 0.0
    finally:
        await runtime.stop()
