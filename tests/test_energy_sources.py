"""Energy sources: the remote source against a real /energy route; the model server's /energy without a GPU;
`edge-proxy record`; `--energy-source auto` on a machine without NVML (the sampler over replayed traces:
test_energy_sampler_replay.py)."""
from __future__ import annotations

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
from edge_proxy.energy.readings import ReaderError
from edge_proxy.energy.remote_source import RemoteReader
from edge_proxy.energy.replay_source import ReplayReader, load_trace
from edge_proxy.energy.sampler import Sampler
from model_server.energy_route import register_energy_routes
from prometheus_client import CollectorRegistry

TRACE = Path(__file__).parent / "data" / "energy_h100_synthetic.jsonl"


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




def test_record_from_a_source_that_never_answers_says_so(tmp_path):
    """``--source remote`` at a port where nothing listens: every read fails; the trace (gaps only) is kept, and the
    command says so and exits 1 instead of reporting success with 0 J."""
    from tests.net_support import free_port
    out = tmp_path / "gaps.jsonl"
    res = subprocess.run([sys.executable, "-m", "edge_proxy", "record", str(out), "--source", "remote", "--url",
                          f"http://127.0.0.1:{free_port()}", "--duration", "0.5", "--period", "0.1", "--quiet"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("edge-proxy record: error: every read failed")
    import json
    header, *records = [json.loads(line) for line in out.read_text().splitlines()]
    assert header["source"] == "remote" and records and all("error" in r for r in records)
    with pytest.raises(ReaderError, match="at least two counter readings"):     # what replay would say later
        load_trace(out)
