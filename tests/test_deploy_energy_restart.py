"""Remote energy survives the model-server pod moving (issue 20).

Two real server processes answer ``GET /energy`` one after the other on the same address, as a
Service does when scale-to-zero brings the model server back on another node: the first on an
"old node" (its monotonic clock reads 864,000 s more) with one pair of GPUs, the second on a "fresh
node" (its own clock) with other GPUs. Each process serves the model server's own route
(``model_server.energy_route``) with a replayed counter trace (CI has no NVML); the proxy's
``RemoteReader`` and ``Sampler`` poll across the switch. After the restart the reader must list only
the new GPUs, and the new server's energy must reach the sampler's ticks.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_proxy.energy.remote_source import RemoteReader
from edge_proxy.energy.sampler import Sampler
from tests.net_support import free_port, stop_process, wait_http_ok

TRACE = Path(__file__).parent / "data" / "energy_h100_synthetic.jsonl"

# A real /energy server process: the model server's route, a replayed trace, a shifted clock.
SERVER = r"""
import sys, time
from aiohttp import web
from edge_proxy.energy.replay_source import ReplayReader
from model_server.energy_route import register_energy_routes
trace, port, shift_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
clock = lambda: time.monotonic_ns() + int(shift_s * 1e9)
app = web.Application()
register_energy_routes(app, ["from-trace"], period_seconds=0.05, clock_ns=clock,
                       reader_factory=lambda _u: ReplayReader(trace, mode="realtime", loop=True, clock=clock))
async def health(_r):
    return web.Response(text="ok")
app.router.add_get("/health", health)
web.run_app(app, host="127.0.0.1", port=port, print=None)
"""


def trace_with_uuids(src: Path, dst: Path, suffix: str) -> list[str]:
    """Copy a trace, renaming every GPU UUID (the same counters on other GPUs); return the new UUIDs."""
    text = src.read_text()
    header = json.loads(text.splitlines()[0])
    old = [g["uuid"] for g in header["gpus"]]
    new = [u[:-6] + suffix + u[-2:] for u in old]
    for a, b in zip(old, new):
        text = text.replace(a, b)
    dst.write_text(text)
    return new


def start(trace: Path, port: int, shift_s: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(trace), str(port), str(shift_s)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_http_ok(f"http://127.0.0.1:{port}/health", timeout=60, proc=proc)
    return proc


def poll(reader: RemoteReader, sampler: Sampler, seconds: float, until=lambda: False) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not until():
        for reading in reader.read():
            sampler.ingest(reading)
        time.sleep(0.1)


def test_remote_energy_survives_the_server_moving_to_a_fresh_node(tmp_path: Path) -> None:
    old_uuids = trace_with_uuids(TRACE, tmp_path / "old.jsonl", "aaaa")
    new_uuids = trace_with_uuids(TRACE, tmp_path / "new.jsonl", "bbbb")
    port = free_port()
    reader = RemoteReader(f"http://127.0.0.1:{port}")
    sampler = Sampler(reader, 0.1)

    first = start(tmp_path / "old.jsonl", port, shift_s=864_000.0)     # a node up for 10 days
    try:
        poll(reader, sampler, 30, until=lambda: len(sampler.ticks) >= 5)
    finally:
        stop_process(first, 15)
    assert sorted(reader.gpu_uuids) == sorted(old_uuids)
    assert len(sampler.ticks) >= 5 and reader.restarts_total == 0
    old_last = reader._last_server_t                                      # noqa: SLF001
    assert old_last is not None and old_last > 864_000

    second = start(tmp_path / "new.jsonl", port, shift_s=0.0)           # a fresh node, its own clock
    try:
        def new_energy() -> float:
            return sum(sampler.energy_joules_by_gpu.get(u, 0.0) for u in new_uuids)
        poll(reader, sampler, 30, until=lambda: new_energy() > 0)
    finally:
        stop_process(second, 15)
    assert new_energy() > 0, "the new server's samples were all discarded: energy unmetered"
    assert sorted(reader.gpu_uuids) == sorted(new_uuids), "the old pod's GPUs are still listed"
    assert reader.restarts_total == 1
    last = reader._last_server_t                                          # noqa: SLF001
    assert last is not None and last < old_last, "still asking for the old server's times"
    # Ticks after the switch are stamped in local time, after the ones before it.
    assert all(b.t0_ns >= a.t1_ns for a, b in zip(sampler.ticks, list(sampler.ticks)[1:]))


@pytest.mark.parametrize("answer,why", [
    ({"instance_id": "b", "gpus": [{"uuid": "G1"}], "now_monotonic_seconds": 50.0}, "instance_id"),
    ({"gpus": [{"uuid": "G2"}], "now_monotonic_seconds": 50.0}, "GPUs changed"),
    ({"gpus": [{"uuid": "G1"}], "now_monotonic_seconds": 5.0}, "clock went back"),
])
def test_restart_signals(answer: dict, why: str) -> None:
    """Each restart signal alone is detected (servers that predate instance_id included)."""
    reader = RemoteReader("http://127.0.0.1:9")
    first = {"gpus": [{"uuid": "G1"}], "now_monotonic_seconds": 40.0}
    if "instance_id" in answer:
        first["instance_id"] = "a"
    assert reader._restarted(first) is None                              # noqa: SLF001
    reader._last_server_t = 39.0                                          # noqa: SLF001
    got = reader._restarted(answer)                                       # noqa: SLF001
    assert got is not None and why in got
    reader._reset(got)                                                    # noqa: SLF001 (as read() does)
    assert reader._restarted(answer) is None                              # noqa: SLF001
