"""Energy when this proxy does not see all GPU work, and each request's prefill/decode split:
idle power is learned only from ticks where the source says the GPU was at rest; a busy tick with
none of this proxy's requests in flight is foreign energy (its own counter, never idle, never
attributed, a rate-limited warning); attributed + idle + foreign = measured. End to end: two
proxies in front of one model server (one attributes, the other forwards), a replayed trace."""
from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import aiohttp
import openai
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edge_proxy.config import load_settings
from edge_proxy.energy import ledger as ledger_mod
from edge_proxy.energy.exporter import register_energy_metrics
from edge_proxy.energy.ledger import Ledger
from edge_proxy.energy.readings import ReaderError, Tick
from edge_proxy.energy.replay_source import ReplayReader
from edge_proxy.energy.sampler import Sampler
from edge_proxy.proxy.server import build_proxy

MS = 1_000_000


def tick(t0_ms: int, t1_ms: int, joules: float, at_rest: bool | None) -> Tick:
    return Tick(t0_ms * MS, t1_ms * MS, joules, {"GPU-x": joules}, False, at_rest)


def conserved(led: Ledger) -> bool:
    t = led.snapshot()
    return abs(t.active_joules + t.idle_joules + t.foreign_joules + t.pending_joules - t.measured_joules) < 1e-6


def test_idle_power_is_learned_at_rest_and_busy_ticks_without_requests_are_foreign():
    """The H200 case of issue 18: others keep the GPU busy at 356 W while this proxy has nothing in
    flight; its real idle draw is 126 W. Old rule: 356 W learned as idle. Now: learned 126 W at rest,
    the busy ticks are foreign above idle."""
    led = Ledger(idle_watts=None, idle_settle_seconds=0.0)
    for k in range(10):                                     # other clients' work: busy, 35.6 J / 100 ms
        led.add_tick(tick(100 * k, 100 * (k + 1), 35.6, at_rest=False))
    assert led.idle_watts == 0.0 and led.idle_power_source == "default"
    t = led.snapshot()
    assert t.foreign_joules == pytest.approx(356.0) and t.idle_joules == 0.0 and t.ticks_foreign == 10
    for k in range(10, 15):                                 # at rest: 126 W
        led.add_tick(tick(100 * k, 100 * (k + 1), 12.6, at_rest=True))
    assert led.idle_watts == pytest.approx(126.0) and led.idle_power_source == "learned_at_rest"
    for k in range(15, 20):                                 # busy again, still nothing of ours
        led.add_tick(tick(100 * k, 100 * (k + 1), 35.6, at_rest=False))
    t = led.snapshot()
    assert t.foreign_joules == pytest.approx(356.0 + 5 * (35.6 - 12.6))
    assert t.idle_joules == pytest.approx(5 * 12.6 + 5 * 12.6)
    assert led.idle_watts == pytest.approx(126.0)           # busy ticks never teach idle
    # a request of ours: the tick is split between idle and the request, nothing foreign
    led.start("r", 2000 * MS, "m", True)
    led.tokens("r", 1, 2050 * MS, prompt_tokens=4)
    led.end("r", 2090 * MS, 4, 1)
    led.add_tick(tick(2000, 2100, 35.6, at_rest=False))
    led.add_tick(tick(2100, 2200, 12.6, at_rest=True))
    r = led.result("r")
    assert r.final and r.active_joules == pytest.approx(35.6 - 12.6)
    assert led.snapshot().ticks_foreign == 15
    assert conserved(led)


def test_sources_that_cannot_tell_keep_the_old_rule_and_configured_wins():
    led = Ledger(idle_watts=None, idle_settle_seconds=0.0)
    led.add_tick(tick(0, 100, 7.5, at_rest=None))
    assert led.idle_watts == pytest.approx(75.0) and led.idle_power_source == "learned_no_requests"
    assert led.snapshot().foreign_joules == 0.0
    led2 = Ledger(idle_watts=60.0)
    led2.add_tick(tick(0, 100, 20.0, at_rest=False))
    assert led2.idle_power_source == "configured" and led2.idle_watts == 60.0
    assert led2.snapshot().foreign_joules == pytest.approx(14.0) and conserved(led2)


def test_large_foreign_share_warns_at_most_every_five_minutes(caplog):
    led = Ledger(idle_watts=50.0)
    caplog.set_level(logging.WARNING, logger=ledger_mod.__name__)
    for k in range(2000):                                   # 200 s of busy ticks nobody here asked for
        led.add_tick(tick(100 * k, 100 * (k + 1), 30.0, at_rest=False))
    warnings = [r for r in caplog.records if "foreign" in r.getMessage()]
    assert len(warnings) == 1 and "does not see" in warnings[0].getMessage()
    led2 = Ledger(idle_watts=50.0)
    caplog.clear()
    for k in range(2000):                                   # at rest: nothing foreign, no warning
        led2.add_tick(tick(100 * k, 100 * (k + 1), 5.0, at_rest=True))
    assert not [r for r in caplog.records if "foreign" in r.getMessage()]


def test_first_token_splits_full_energy_into_prefill_and_decode():
    led = Ledger(idle_watts=0.0, prefill_weight=0.0)
    led.start("s", 0, "m", True)
    led.start("n", 0, "m", stream=False)
    led.tokens("s", 1, 150 * MS, prompt_tokens=3)          # first token in the second tick
    for k in range(2, 4):
        led.tokens("s", 1, (100 * k + 50) * MS)
    led.end("s", 390 * MS, 3, 3)
    led.tokens("n", 4, 390 * MS)
    led.end("n", 390 * MS, 3, 4)
    for k in range(5):
        led.add_tick(tick(100 * k, 100 * (k + 1), 10.0, at_rest=None))
    s, n = led.result("s"), led.result("n")
    assert s.final and n.final
    # prefill: ticks 0 and 1 (the one holding t_first); decode: ticks 2 and 3
    assert s.prefill_joules is not None and s.decode_joules is not None
    assert s.prefill_joules + s.decode_joules == pytest.approx(s.full_joules)
    # n (one response, 4 tokens over 390 ms) weighs 4 x overlap / 390 ms in each tick; s its tokens
    w_n = 4 * 100 / 390
    assert s.prefill_joules == pytest.approx(10.0 * 1 / (1 + w_n))                 # tick 1 (tick 0: w_s = 0)
    assert s.decode_joules == pytest.approx(10.0 * 1 / (1 + w_n) + 10.0 * 1 / (1 + 4 * 90 / 390))
    # token times unknown (one response): split by weight, prefill_weight x prompt : output (0 : 4 here)
    assert n.prefill_joules == 0.0 and n.decode_joules == pytest.approx(n.full_joules)
    led2 = Ledger(idle_watts=0.0, prefill_weight=1.0)
    led2.start("n", 0, "m", stream=False)
    assert led2.result("n").prefill_joules is None                    # counts not known yet
    led2.tokens("n", 4, 90 * MS)
    led2.end("n", 90 * MS, prompt_tokens=12, output_tokens=4)
    led2.add_tick(tick(0, 100, 8.0, at_rest=None))
    n2 = led2.result("n")
    assert n2.final and n2.prefill_joules == pytest.approx(8.0 * 12 / 16)
    assert n2.prefill_joules + n2.decode_joules == pytest.approx(n2.full_joules)


def test_replay_traces_carry_at_rest_optionally(tmp_path):
    lines = [{"kind": "header", "source": "nvml", "period_seconds": 0.1}]
    mj = 1_000_000
    for i in range(6):
        mj += 10_000 if i < 3 else 30_000
        lines.append({"t": i * 0.1, "energy_millijoules": {"GPU-a": mj}, "at_rest": i < 3})
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in lines))
    reader = ReplayReader(p, mode="driven", loop=False, origin_ns=0)
    sampler = Sampler(reader, 0.1)
    ticks = [t for _ in range(6) for t in sampler.step()]
    assert [t.at_rest for t in ticks] == [True, True, False, False, False]
    old = tmp_path / "old.jsonl"                             # recorded before the field existed
    old.write_text("\n".join(json.dumps({k: v for k, v in x.items() if k != "at_rest"}) for x in lines))
    s2 = Sampler(ReplayReader(old, mode="driven", loop=False, origin_ns=0), 0.1)
    assert {t.at_rest for _ in range(6) for t in s2.step()} == {None}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"t": 0, "energy_millijoules": {"g": 1}, "at_rest": "yes"}) + "\n"
                   + json.dumps({"t": 0.1, "energy_millijoules": {"g": 2}}))
    with pytest.raises(ReaderError, match="line 1"):
        ReplayReader(bad)


def test_scrape_exports_foreign_energy_and_how_idle_power_was_obtained():
    led = Ledger(idle_watts=None, idle_settle_seconds=0.0)
    reg = CollectorRegistry()
    trace_reader = type("R", (), {"source": "replay", "gpu_uuids": ["GPU-x"], "read": lambda self: [],
                                  "close": lambda self: None})()
    register_energy_metrics(reg, led, Sampler(trace_reader, 0.1))
    led.add_tick(tick(0, 100, 10.0, at_rest=True))
    led.add_tick(tick(100, 200, 30.0, at_rest=False))
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}
    (foreign,) = fams["edge_proxy_foreign_energy_joules"].samples
    assert foreign.value == pytest.approx(20.0)
    (pidle,) = fams["edge_proxy_energy_idle_power_watts"].samples
    assert pidle.labels == {"idle_power_source": "learned_at_rest"} and pidle.value == pytest.approx(100.0)
    measured = sum(s.value for s in fams["edge_proxy_gpu_energy_joules"].samples if s.name.endswith("_total"))
    idle = fams["edge_proxy_idle_energy_joules"].samples[0].value
    assert measured == pytest.approx(idle + foreign.value)


# ---- N proxies in front of one GPU server -----------------------------------------------------

def busy_trace(path: Path, seconds: float = 30.0) -> None:
    """A trace where the GPU is busy (300 W, at_rest false) in alternate 2 s phases, at rest (100 W)
    otherwise: what NVML reports while other clients use the same server."""
    lines = [{"kind": "header", "source": "nvml", "period_seconds": 0.05, "note": "generated by the test"}]
    mj = 5_000_000
    for i in range(int(seconds / 0.05)):
        busy = (i // 40) % 2 == 0
        mj += int((300.0 if busy else 100.0) * 0.05 * 1000)
        lines.append({"t": round(i * 0.05, 3), "energy_millijoules": {"GPU-e2e": mj}, "at_rest": not busy})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")


@pytest.mark.asyncio
async def test_two_proxies_in_front_of_one_server_attribute_each_request_once(model_server, tmp_path):
    """The documented topology (docs/metrics.md): the proxy next to the server attributes energy
    (it sees every request); replicas in front of it forward with `--energy-source none`. Requests
    through the replica and directly to the attributing proxy are each attributed once, by it."""
    trace = tmp_path / "busy.jsonl"
    busy_trace(trace)
    log_a = tmp_path / "a.jsonl"
    a = build_proxy(load_settings(None, {
        ("proxy", "backend_url"): model_server.url, ("proxy", "port"): 0, ("proxy", "metrics_port"): 0,
        ("proxy", "access_log"): str(log_a), ("energy", "source"): "replay",
        ("energy", "replay_path"): str(trace), ("energy", "period_seconds"): 0.05}, environ={}))
    await a.start()
    b = None
    try:
        b = build_proxy(load_settings(None, {
            ("proxy", "backend_url"): a.url, ("proxy", "port"): 0, ("proxy", "metrics_port"): 0,
            ("proxy", "access_log"): "none", ("energy", "source"): "none"}, environ={}))
        await b.start()
        ca = openai.AsyncOpenAI(base_url=a.url + "/v1", api_key="x", max_retries=0)
        cb = openai.AsyncOpenAI(base_url=b.url + "/v1", api_key="x", max_retries=0)
        model = (await ca.models.list()).data[0].id

        async def stream(c: openai.AsyncOpenAI, i: int) -> int:
            s = await c.chat.completions.create(model=model, messages=[{"role": "user", "content": f"hi {i}"}],
                                                max_tokens=6, stream=True, extra_body={"ignore_eos": True})
            return sum(1 for ch in [x async for x in s] for c_ in ch.choices if c_.delta.content)

        counts = await asyncio.gather(*(stream(cb, i) for i in range(3)), *(stream(ca, i) for i in range(2)))
        await asyncio.sleep(2.5)              # nothing in flight while the trace says busy: foreign
        counts += await asyncio.gather(*(stream(cb, i) for i in range(2)))
        assert all(c > 0 for c in counts)
        await ca.close()
        await cb.close()
        await b.drain()
        await a.drain()
        async with aiohttp.ClientSession() as s:
            async with s.get(a.metrics_url) as r:
                text_a = await r.text()
            async with s.get(b.metrics_url) as r:
                text_b = await r.text()
    finally:
        if b is not None:
            await b.stop()
        await a.stop()
    fams = {f.name: f for f in text_string_to_metric_families(text_a)}

    def total(name: str) -> float:
        return sum(s.value for s in fams[name].samples if not s.name.endswith("_created"))
    measured = total("edge_proxy_gpu_energy_joules")
    attributed, idle = total("edge_proxy_attributed_energy_joules"), total("edge_proxy_idle_energy_joules")
    foreign, pending = total("edge_proxy_foreign_energy_joules"), total("edge_proxy_energy_unapportioned_joules")
    assert measured > 0 and attributed > 0 and foreign > 0
    assert attributed + idle + foreign + pending == pytest.approx(measured, rel=1e-9)
    assert fams["edge_proxy_energy_idle_power_watts"].samples[0].labels["idle_power_source"] == "learned_at_rest"
    assert "edge_proxy_gpu_energy_joules" not in text_b and "edge_proxy_attributed_energy" not in text_b
    # every request (7: 5 through the replica, 2 direct) is in the attributing proxy's log, once,
    # with its energy and the prefill/decode split of its full joules
    recs = [json.loads(x) for x in log_a.read_text().splitlines() if x.strip()]
    gen = [r for r in recs if r.get("route") == "/v1/chat/completions"]
    assert len(gen) == 7
    for r in gen:
        e = r["energy"]
        assert e["source"] == "replay" and e["full_joules"] >= e["active_joules"] >= 0
        assert e["prefill_joules"] is not None and e["decode_joules"] is not None
        assert e["prefill_joules"] + e["decode_joules"] == pytest.approx(e["full_joules"], rel=1e-6, abs=1e-9)
    assert sum(s.value for s in fams["edge_proxy_request_phase_energy_joules"].samples
               if s.name.endswith("_count")) == 14          # 7 requests x 2 phases
