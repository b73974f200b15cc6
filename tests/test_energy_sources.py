"""Energy sources and the sampler: replayed traces with resets, failed reads and gaps; the remote
source against a real /energy route; the model server's /energy without a GPU; `edge-proxy record`;
`--energy-source auto` on a machine without NVML."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from edge_proxy.config import ConfigError, load_settings
from edge_proxy.energy.factory import create_energy
from edge_proxy.energy.ledger import Ledger
from edge_proxy.energy.readings import ReaderError
from edge_proxy.energy.remote_source import RemoteReader
from edge_proxy.energy.replay_source import ReplayReader, load_trace
from edge_proxy.energy.sampler import Sampler
from model_server.energy_route import register_energy_routes
from prometheus_client import CollectorRegistry

TRACE = Path(__file__).parent / "data" / "energy_h100_synthetic.jsonl"


def expected_from_trace(path: Path) -> tuple[dict[str, float], int, int]:
    """Independent reading of a trace: per-GPU joules (sum of non-negative deltas between
    successive good readings), the number of counter drops, the number of failed reads."""
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    good = [x for x in lines if "energy_millijoules" in x]
    errors = sum(1 for x in lines if "error" in x)
    joules: dict[str, float] = {}
    drops = 0
    for a, b in zip(good, good[1:]):
        for u, v in b["energy_millijoules"].items():
            d = v - a["energy_millijoules"][u]
            if d < 0:
                drops += 1
                d = 0
            joules[u] = joules.get(u, 0.0) + d / 1000.0
    return joules, drops, errors


def gaps_in_trace(path: Path) -> int:
    """Independent count of the gap ticks a trace must produce: every good read after the first
    that follows a failed read or sees any counter go down closes one gap tick (the trace has no
    unchanged-counter reads, which close no tick)."""
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    gaps, pending, prev = 0, False, None
    for x in lines:
        if "error" in x:
            pending = True
            continue
        if "energy_millijoules" not in x:
            continue
        if prev is not None:
            assert x["energy_millijoules"] != prev["energy_millijoules"]
            drop = any(v < prev["energy_millijoules"][u] for u, v in x["energy_millijoules"].items())
            gaps += pending or drop
            pending = False
        prev = x
    return gaps


def test_driven_replay_clamps_resets_and_records_gaps(caplog):
    expected, drops, errors = expected_from_trace(TRACE)
    assert drops >= 1 and errors >= 1        # the trace really holds the defects under test
    reader = ReplayReader(TRACE, mode="driven", loop=False, origin_ns=0)
    sampler = Sampler(reader, 0.1)
    ledger = Ledger(idle_watts=None)
    sampler.add_listener(ledger.add_tick)
    with caplog.at_level(logging.WARNING, logger="edge_proxy.energy.sampler"):
        while not reader.exhausted:
            sampler.step()
    snap = sampler.snapshot()
    for u, j in expected.items():
        assert snap["energy_joules_by_gpu"][u] == pytest.approx(j, rel=1e-12)
    assert sampler.resets_total == drops and sampler.errors_total == errors
    gaps = gaps_in_trace(TRACE)
    assert gaps >= 2                          # a reset and a failed read, on different ticks
    assert sampler.gaps_total == gaps == sum(t.gap for t in sampler.ticks)
    ticks = list(sampler.ticks)
    assert all(a.t1_ns == b.t0_ns for a, b in zip(ticks, ticks[1:]))          # contiguous
    assert max(t.dt_seconds for t in ticks) > 1.0                              # the 1.2 s gap is one tick
    assert all(t.joules >= 0 for t in ticks)
    # the failed read is logged once (it occurs once; a second identical failure would not log again)
    assert sum("read failed" in r.getMessage() for r in caplog.records) == 1
    assert sum("went down" in r.getMessage() for r in caplog.records) == drops
    ledger.flush()
    tot = ledger.snapshot()
    assert tot.measured_joules == pytest.approx(sum(expected.values()), rel=1e-12)
    assert tot.idle_joules == pytest.approx(tot.measured_joules)              # nothing was in flight
    assert ledger.idle_watts > 0


def test_repeated_failures_log_once(caplog):
    reader = ReplayReader(TRACE, mode="driven", loop=True, origin_ns=0)
    sampler = Sampler(reader, 0.1)
    with caplog.at_level(logging.WARNING, logger="edge_proxy.energy.sampler"):
        for _ in range(3 * len(reader.records)):      # three passes: three failed reads, three resets
            sampler.step()
    assert sampler.errors_total >= 3
    assert sum("read failed" in r.getMessage() for r in caplog.records) == 1


def test_replay_with_requests_conserves_energy():
    reader = ReplayReader(TRACE, mode="driven", loop=False, origin_ns=0)
    sampler = Sampler(reader, 0.1)
    ledger = Ledger(idle_watts=None, max_defer_seconds=5.0)
    sampler.add_listener(ledger.add_tick)
    n = 0
    while not reader.exhausted:
        ticks = sampler.step()
        for t in ticks:                                  # a request every tick, 3 ticks long, 2 tokens/tick
            rid = f"r{n}"
            n += 1
            ledger.start(rid, t.t1_ns - 5_000_000, "m", stream=n % 3 != 0)
            for k in range(3):
                ledger.tokens(rid, 2, t.t1_ns + k * 100_000_000)
            ledger.end(rid, t.t1_ns + 250_000_000, prompt_tokens=20, output_tokens=6, now_ns=t.t1_ns)
    ledger.flush()
    tot = ledger.snapshot()
    assert tot.measured_joules > 0 and tot.active_joules > 0
    assert tot.active_joules + tot.idle_joules == pytest.approx(tot.measured_joules, rel=1e-9)


def test_bad_traces_fail_with_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"t": 0, "energy_millijoules": {"g": 1}}\n{"t": 0.1, "energy_millijoules": "x"}\n')
    with pytest.raises(ReaderError, match="line 2"):
        load_trace(bad)
    with pytest.raises(ReaderError, match="cannot read"):
        load_trace(tmp_path / "missing.jsonl")
    back = tmp_path / "back.jsonl"
    back.write_text('{"t": 1, "energy_millijoules": {"g": 1}}\n{"t": 0.5, "energy_millijoules": {"g": 2}}\n')
    with pytest.raises(ReaderError, match="backwards"):
        load_trace(back)


def test_gzipped_traces_replay_as_the_plain_file(tmp_path):
    """The traces under benchmarks/results/ are committed compressed: a .gz path reads as its content."""
    import gzip

    text = '{"kind": "header", "source": "nvml"}\n{"t": 0, "energy_millijoules": {"g": 1}}\n' \
           '{"t": 0.1, "energy_millijoules": {"g": 9}, "power_watts": {"g": 80.0}}\n'
    plain, packed = tmp_path / "t.jsonl", tmp_path / "t.jsonl.gz"
    plain.write_text(text)
    packed.write_bytes(gzip.compress(text.encode()))
    assert load_trace(packed) == load_trace(plain)
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(ReaderError, match="cannot read"):
        load_trace(tmp_path / "bad.jsonl.gz")


def test_realtime_replay_thread_produces_ticks():
    reader = ReplayReader(TRACE, mode="realtime", loop=True)
    sampler = Sampler(reader, 0.05)
    sampler.start()
    try:
        deadline = time.monotonic() + 10
        while len(sampler.ticks) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sampler.stop()
    assert len(sampler.ticks) >= 3
    assert not sampler.running


def test_auto_source_falls_back_to_estimated_without_nvml():
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("this machine has NVML; the fallback is tested where it has none")
    except pynvml.NVMLError:
        pass
    settings = load_settings(None, {("energy", "source"): "auto"}, environ={})
    comp = create_energy(settings, CollectorRegistry())
    assert comp is not None and comp.source == "estimated" and "auto -> estimated" in comp.note
    with pytest.raises(ConfigError, match="energy source nvml"):
        create_energy(load_settings(None, {("energy", "source"): "nvml"}, environ={}), CollectorRegistry())
    with pytest.raises(ConfigError, match="replay_path"):
        create_energy(load_settings(None, {("energy", "source"): "replay"}, environ={}), CollectorRegistry())


def test_serve_logs_the_chosen_source_at_startup():
    env = dict(os.environ, EDGE_PROXY_ENERGY_SOURCE="replay", EDGE_PROXY_ENERGY_REPLAY_PATH=str(TRACE))
    proc = subprocess.Popen([sys.executable, "-m", "edge_proxy", "serve", "--port", "0", "--metrics-port", "none",
                             "--access-log", "none", "--backend", "http://127.0.0.1:9"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "listening on" in line:
                break
        assert any("energy source: replay" in x for x in lines), lines
    finally:
        proc.terminate()
        proc.wait(20)
    bad = subprocess.run([sys.executable, "-m", "edge_proxy", "serve", "--energy-source", "replay",
                          "--energy-replay", "/nonexistent/trace.jsonl", "--check-config"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "cannot read replay trace" in bad.stderr


@pytest.mark.asyncio
async def test_remote_source_aligns_samples_from_energy_route():
    uuids = [u for u in load_trace(TRACE)[1][0].energy_mj]
    app = web.Application()
    register_energy_routes(app, uuids, period_seconds=0.02,
                           reader_factory=lambda u: ReplayReader(TRACE, mode="realtime", loop=True))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]   # noqa: SLF001
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/energy") as r:
                first = await r.json()
            assert r.status == 200 and first["source"] == "replay"
            async with s.get(base + "/energy?since=abc") as r:
                assert r.status == 400
        import asyncio
        loop = asyncio.get_running_loop()
        reader = RemoteReader(base, uuids)
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 5 and time.monotonic() < deadline:
            got += await loop.run_in_executor(None, reader.read)
            await asyncio.sleep(0.1)
        good = [g for g in got if g.error is None]
        assert len(good) >= 5
        assert all(b.t_ns > a.t_ns for a, b in zip(good, good[1:]))          # no sample twice
        # same host, same monotonic clock: the estimated offset is within the best round trip
        best_rtt, offset = min(reader._offsets)                              # noqa: SLF001
        assert abs(offset) <= best_rtt
        # aligned sample times are in the past of the local clock, never the future (beyond that bound)
        assert max(g.t_ns for g in good) <= time.monotonic_ns() + best_rtt
    finally:
        await runner.cleanup()


@pytest.mark.asyncio
async def test_energy_route_without_gpu_answers_source_none():
    app = web.Application()
    register_energy_routes(app, [])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]   # noqa: SLF001
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/energy") as r:
                body = await r.json()
        assert r.status == 200
        assert body["source"] == "none" and body["gpus"] == [] and body["samples"] == []
        assert body["now_monotonic_seconds"] > 0 and body["now_epoch_seconds"] > 1e9
        reader = RemoteReader(f"http://127.0.0.1:{port}")
        import asyncio
        (reading,) = await asyncio.get_running_loop().run_in_executor(None, reader.read)
        assert reading.error is not None and "none" in reading.error
    finally:
        await runner.cleanup()


def test_model_server_energy_route(model_server):
    import requests
    r = requests.get(model_server.url + "/energy", timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["source"] == "none"          # CPU-only CI: no NVML, never an error
    assert set(body) >= {"source", "now_monotonic_seconds", "now_epoch_seconds", "gpus", "samples"}


def test_record_writes_a_replayable_trace(tmp_path):
    out = tmp_path / "rec.jsonl"
    res = subprocess.run([sys.executable, "-m", "edge_proxy", "record", str(out), "--source", "estimated",
                          "--duration", "0.6", "--period", "0.05", "--quiet"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    header, records = load_trace(out)
    assert header["source"] == "estimated" and len(records) >= 5
    reader = ReplayReader(out, mode="driven", loop=False, origin_ns=0)
    sampler = Sampler(reader, 0.05)
    while not reader.exhausted:
        sampler.step()
    assert 1 <= len(sampler.ticks) <= len(records) - 1      # reads without a counter change close no tick
    nvml = subprocess.run([sys.executable, "-m", "edge_proxy", "record", str(tmp_path / "x"), "--duration", "1"],
                          capture_output=True, text=True, timeout=60)
    import pynvml                               # nvidia-ml-py: a dependency of the proxy
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        assert nvml.returncode == 2 and nvml.stderr.strip().startswith("edge-proxy record: error: NVML")
    else:                                       # a machine with a GPU: a real NVML trace
        assert nvml.returncode == 0, nvml.stderr
        nheader, nrecords = load_trace(tmp_path / "x")
        assert nheader["source"] == "nvml" and len(nrecords) >= 2


# ---- property: any counter sequence with resets and failed reads -----------------------------------
from hypothesis import given, settings as hsettings, strategies as st  # noqa: E402


@hsettings(max_examples=60, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(1, 300), st.integers(0, 90_000),
                                st.sampled_from(["ok", "ok", "ok", "ok", "reset", "error", "gap"])),
                      min_size=2, max_size=60))
def test_sampler_totals_match_the_trace_for_any_resets_and_gaps(steps, tmp_path_factory):
    """Per GPU: measured = sum of the non-negative deltas between successive good reads; ticks are
    contiguous, never negative, and every reset or failed read leaves a gap mark."""
    path = tmp_path_factory.mktemp("trace") / "t.jsonl"
    t, counter, lines = 0.0, 5_000_000, []
    for dt_ms, inc, kind in steps:
        t += dt_ms / 1000.0 * (10 if kind == "gap" else 1)
        counter += inc
        if kind == "reset":
            counter = inc // 7
        if kind == "error":
            lines.append({"t": round(t, 6), "error": "NVMLError_Unknown"})
        else:
            lines.append({"t": round(t, 6), "energy_millijoules": {"GPU-p": counter}})
    if sum(1 for x in lines if "error" not in x) < 2:
        lines.append({"t": round(t + 0.1, 6), "energy_millijoules": {"GPU-p": counter}})
        lines.append({"t": round(t + 0.2, 6), "energy_millijoules": {"GPU-p": counter + 1}})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    expected, drops, errors = expected_from_trace(path)
    reader = ReplayReader(path, mode="driven", loop=False, origin_ns=0)
    sampler = Sampler(reader, 0.1)
    ledger = Ledger(idle_watts=None)
    sampler.add_listener(ledger.add_tick)
    while not reader.exhausted:
        sampler.step()
    ticks = list(sampler.ticks)
    assert sampler.snapshot()["energy_joules_by_gpu"]["GPU-p"] == pytest.approx(expected.get("GPU-p", 0.0))
    assert all(a.t1_ns == b.t0_ns for a, b in zip(ticks, ticks[1:]))
    assert all(tk.joules >= 0 for tk in ticks)
    assert sampler.resets_total == drops and sampler.errors_total == errors
    good = [i for i, x in enumerate(lines) if "error" not in x]
    inner_errors = sum(1 for i, x in enumerate(lines) if "error" in x and good[0] < i < good[-1])
    assert sum(1 for tk in ticks if tk.gap) >= min(1, drops + inner_errors)
    ledger.flush()
    assert ledger.snapshot().measured_joules == pytest.approx(sum(expected.values()))


def test_unchanged_counter_reads_close_no_tick(tmp_path):
    """A read that lands before the counter's next update sees the same value: no 0 J tick; the next
    update closes one tick over the whole time. A counter that stops still closes ticks eventually."""
    lines = [(0.0, 1000), (0.1, 9000), (0.2, 9000), (0.3, 25000), (0.4, 33000)]
    lines += [(0.4 + 0.1 * k, 33000) for k in range(1, 9)]          # stopped counter for 0.8 s
    path = tmp_path / "stale.jsonl"
    path.write_text("".join(json.dumps({"t": t, "energy_millijoules": {"g": v}}) + "\n" for t, v in lines))
    reader = ReplayReader(path, mode="driven", loop=False, origin_ns=0)
    sampler = Sampler(reader, 0.1)
    while not reader.exhausted:
        sampler.step()
    ticks = list(sampler.ticks)
    assert [(round(t.t0_ns / 1e9, 3), round(t.t1_ns / 1e9, 3), t.joules) for t in ticks[:3]] == [
        (0.0, 0.1, 8.0), (0.1, 0.3, 16.0), (0.3, 0.4, 8.0)]
    assert len(ticks) == 4 and ticks[3].joules == 0.0 and ticks[3].t1_ns - ticks[3].t0_ns == 500_000_000
