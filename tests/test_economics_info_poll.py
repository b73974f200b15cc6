"""Economics polls the backend's /info for weight bytes: quickly while the backend is down or
loading, slowly once it answers. Traffic must not turn that poll into one /info request per
proxied request (a TGI-like backend reports no weight bytes; a vLLM-like one has no /info)."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.proxy_support import InProcessUpstream, wait_until
from tests.running_proxy_support import running_proxy


@pytest.mark.parametrize("info_status", [200, 404])
def test_requests_do_not_multiply_info_polls(info_status: int) -> None:
    async def scenario() -> None:
        async with InProcessUpstream() as up:
            up.state.info_status = info_status
            async with running_proxy(up.url) as proxy:
                econ = proxy.components["economics"]
                assert await wait_until(lambda: up.state.info_hits >= 1)
                assert await wait_until(lambda: econ.info.settled)
                before = up.state.info_hits
                async with aiohttp.ClientSession() as s:
                    for i in range(60):
                        async with s.post(proxy.url + "/v1/completions",
                                          json={"model": "fake-model", "prompt": f"p{i}", "max_tokens": 2}) as r:
                            assert r.status == 200
                            await r.read()
                await proxy.drain()
                await asyncio.sleep(0.3)
                # the slow interval (30 s by default) has not passed: no request polled /info
                assert up.state.info_hits - before == 0, up.state.info_hits - before
    asyncio.run(scenario())


def test_info_poll_wakes_when_backend_comes_up_but_at_most_once_a_second() -> None:
    """A backend that was unreachable at the first poll: a request that succeeds wakes the
    poller (weights picked up without waiting for the backoff), never more than once a second."""
    async def scenario() -> None:
        async with InProcessUpstream() as up:
            up.state.info_status = 503          # looks down/loading to the poller
            async with running_proxy(up.url) as proxy:
                econ = proxy.components["economics"]
                assert await wait_until(lambda: up.state.info_hits >= 1)
                assert not econ.info.settled
                up.state.info_status = 200
                t0 = asyncio.get_running_loop().time()
                async with aiohttp.ClientSession() as s:
                    while asyncio.get_running_loop().time() - t0 < 1.5:
                        async with s.post(proxy.url + "/v1/completions",
                                          json={"model": "fake-model", "prompt": "x", "max_tokens": 1}) as r:
                            assert r.status == 200
                            await r.read()
                assert await wait_until(lambda: econ.info.settled, timeout=3.0)
                assert econ.backend_info.get("model_id") == "fake-model"
                # first poll + at most one per second over ~1.5 s of traffic (backoff 1 s, 2 s...)
                assert up.state.info_hits <= 4, up.state.info_hits
    asyncio.run(scenario())


def test_info_poller_stops_when_cancelled_as_a_request_wakes_it() -> None:
    """Shutdown cancels the poller; a request finishing in the same loop turn sets its wake event.
    The cancellation must not be lost (Python 3.11's wait_for returned the event's result then,
    and the poller kept the proxy's cleanup waiting for a whole poll interval)."""
    async def scenario() -> None:
        async with InProcessUpstream() as up:
            up.state.info_status = 503          # not settled: requests wake the poller
            async with running_proxy(up.url) as proxy:
                econ = proxy.components["economics"]
                assert await wait_until(lambda: up.state.info_hits >= 1)
                econ.cfg.info_poll_seconds = 60.0   # a wait that would outlast the test
                await asyncio.sleep(1.2)            # the poller is waiting on its wake event now
                (task,) = [t for t in econ._tasks if "_poll_info" in repr(t.get_coro())]
                assert not task.done()
                econ.info.wake.set()               # the same loop turn: woken and cancelled
                task.cancel()
                done, _ = await asyncio.wait({task}, timeout=2.0)
                assert task in done and task.cancelled()
    asyncio.run(scenario())
