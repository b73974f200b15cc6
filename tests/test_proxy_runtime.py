"""The runtime owns its resources (``async with``) and the assembly hands each component what it
depends on (no component looks another up at run time)."""
from __future__ import annotations

import socket
import sys

import aiohttp
import openai
import pytest

from edge_proxy.config import load_settings
from edge_proxy.proxy.server import build_proxy
from tests.proxy_support import InProcessUpstream

pytestmark = pytest.mark.asyncio


def _settings(backend_url: str, more: dict | None = None):
    overrides: dict = {("proxy", "backend_url"): backend_url, ("proxy", "port"): 0,
                 ("proxy", "metrics_port"): 0, ("proxy", "access_log"): "none",
                 ("energy", "source"): "none"}
    overrides.update(more or {})
    return load_settings(None, overrides, environ={})


async def test_async_with_serves_then_releases_ports_and_backend_client():
    async with InProcessUpstream() as up:
        rt = build_proxy(_settings(up.url))
        async with rt as px:
            assert px is rt
            client = openai.AsyncOpenAI(base_url=rt.url + "/v1", api_key="x", max_retries=0)
            out = await client.completions.create(model="fake-model", prompt="a b c", max_tokens=3)
            assert out.usage is not None and out.usage.completion_tokens == 3
            await client.close()
            session = rt.core.session
            assert session is not None and not session.closed
            assert rt.core.relay is not None and rt.core.relay.name == "raw"
            url, metrics_url = rt.url, rt.metrics_url
        assert session.closed                    # closed by the runtime, not left to the GC
        assert rt.core.session is None and rt.core.relay is None
        async with aiohttp.ClientSession() as s:
            for u in (url + "/v1/models", metrics_url):
                with pytest.raises(aiohttp.ClientConnectionError):
                    async with s.get(u):
                        pass
        await rt.stop()                          # a second stop is harmless


async def test_failed_start_releases_what_it_opened():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        rt = build_proxy(_settings("http://127.0.0.1:9", {("proxy", "port"): busy.getsockname()[1]}))
        with pytest.raises(OSError):
            async with rt:
                pass
        assert rt.core.session is None and rt.core.relay is None
        assert rt._runners == []   # noqa: SLF001 - nothing left listening
    finally:
        busy.close()


async def test_assembly_hands_components_their_dependencies():
    rt = build_proxy(_settings(
        "http://127.0.0.1:9", {("energy", "source"): "estimated", ("coldstart", "spawn"):
                                 f"{sys.executable} -c 'import time; time.sleep(60)' {{port}}"}))
    energy, econ, gate = rt.components["energy"], rt.components["economics"], rt.components["coldstart"]
    assert rt.gate is gate and rt.core.gate is gate
    assert econ.coldstart is gate and econ.energy_component is energy and gate.recorder.energy is energy
    # order of the on_request_final calls: energy first, economics, then the gate
    assert rt.observers[:3] == [energy.observer, econ, gate]
    reader = energy.sampler.reader
    assert reader.spawned_pid is not None and reader.spawned_pid() is None   # nothing spawned yet
    sup = gate.supervisor
    await sup.start()
    try:
        assert sup.pid is not None and reader.spawned_pid() == sup.pid   # the estimate follows it
    finally:
        await sup.stop(grace_seconds=1)
    assert reader.spawned_pid() is None
