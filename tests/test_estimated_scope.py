"""The estimated energy source bills the backend's process tree when the backend is on this machine
(found by its listening port, or the process the proxy spawned), else the whole machine, and says
which in ``scope``. Real processes: a backend that listens and burns CPU in a child, and a "tenant"
that burns CPU outside the tree."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_proxy.energy.estimated_source import SCOPE_MACHINE, SCOPE_TREE, EstimatedReader
from edge_proxy.energy.readings import counter_delta_joules
from tests.net_support import free_port as _free_port
from tests.proxy_support import InProcessUpstream, metric_value
from tests.running_proxy_support import running_proxy

WATTS = 10.0
# burns CPU until the stop file exists (no wall-clock budget: this machine may be slow and shared)
BURN = "import os\nwhile not os.path.exists({stop!r}): pass\n"
# a backend: listens on the port, and its child burns CPU (a grandchild of nothing else)
BACKEND = ("import socket,subprocess,sys,time\n"
           "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
           "s.bind(('127.0.0.1', {port})); s.listen()\n"
           "print('ready', flush=True)\n"
           "subprocess.run([sys.executable, '-c', {burn!r}])\n"
           "time.sleep(30)\n")


def _cpu_seconds(pids: list[int]) -> float:
    """user + system seconds of these processes, straight from /proc (independent of psutil)."""
    tck = 100.0
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tck
    return total


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


def _joules(reader: EstimatedReader, a, b) -> float:
    (ra,), (rb,) = a, b
    return counter_delta_joules(ra.energy_mj["cpu-estimated"], rb.energy_mj["cpu-estimated"])[0]


def test_backend_tree_is_billed_not_other_tenants(tmp_path: Path):
    stop = str(tmp_path / "stop")
    port = _free_port()
    backend = subprocess.Popen([sys.executable, "-c", BACKEND.format(port=port, burn=BURN.format(stop=stop))],
                               stdout=subprocess.PIPE, text=True)
    tenant = None
    try:
        assert backend.stdout.readline().strip() == "ready"
        reader = EstimatedReader(WATTS, scope="auto", backend_url=f"http://127.0.0.1:{port}")
        machine = EstimatedReader(WATTS, scope="machine")
        first, mfirst = reader.read(), machine.read()
        tree_before = _cpu_seconds([backend.pid, *_children(backend.pid)])
        assert reader.scope == SCOPE_TREE and machine.scope == SCOPE_MACHINE
        tenant = subprocess.Popen([sys.executable, "-c", BURN.format(stop=stop)])
        kids = []
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:           # sample while the child burns
            reader.read()
            kids = kids or _children(backend.pid)
            time.sleep(0.1)
        tree_cpu = _cpu_seconds([backend.pid, *kids]) - tree_before
        last, mlast = reader.read(), machine.read()
        tenant_cpu = _cpu_seconds([tenant.pid])
    finally:
        Path(stop).touch()
        for p in (backend, tenant):
            if p is not None:
                p.kill()
                p.wait()
    billed = _joules(reader, first, last)
    assert kids, "the backend's CPU-burning child was not seen"
    assert tree_cpu > 0.1 and tenant_cpu > 0.1       # both really ran
    # the tree's own CPU (the child's, mostly), to the 10 ms tick, and none of the tenant's
    assert billed == pytest.approx(tree_cpu * WATTS, abs=0.05 * WATTS + 0.1 * tree_cpu * WATTS)
    assert _joules(machine, mfirst, mlast) >= (tree_cpu + tenant_cpu) * WATTS * 0.9


def test_remote_backend_falls_back_to_the_whole_machine_and_says_so():
    r = EstimatedReader(WATTS, scope="auto", backend_url="http://192.0.2.1:8000")   # TEST-NET: not here
    r.read()
    assert r.scope == SCOPE_MACHINE


def test_backend_scope_without_a_backend_process_is_zero():
    r = EstimatedReader(WATTS, scope="backend", backend_url=f"http://127.0.0.1:{_free_port()}")
    (a,) = r.read()
    time.sleep(0.3)
    (b,) = r.read()
    assert r.scope == SCOPE_TREE and b.energy_mj == a.energy_mj


def test_spawned_pid_is_the_tree_root(tmp_path: Path):
    stop = str(tmp_path / "stop")
    burner = subprocess.Popen([sys.executable, "-c", BURN.format(stop=stop)])
    try:
        r = EstimatedReader(WATTS, scope="auto", backend_url=f"http://127.0.0.1:{_free_port()}")
        r.spawned_pid = lambda: burner.pid
        (a,) = r.read()
        for _ in range(5):                  # sampled while it runs, as the sampler thread does
            time.sleep(0.1)
            (b,) = r.read()
    finally:
        Path(stop).touch()
        burner.kill()
        burner.wait()
    assert r.scope == SCOPE_TREE
    assert counter_delta_joules(a.energy_mj["cpu-estimated"], b.energy_mj["cpu-estimated"])[0] > 0


def test_bad_scope_is_a_config_error():
    from edge_proxy.config import ConfigError, load_settings
    from edge_proxy.energy.factory import validate

    s = load_settings(None, {("energy", "estimated_scope"): "gpu"}, environ={})
    with pytest.raises(ConfigError, match="estimated_scope"):
        validate(s.energy)


@pytest.mark.asyncio
async def test_proxy_exports_the_scope():
    async with InProcessUpstream() as up, running_proxy(up.url, ) as px:
        # the fake backend listens in this very process: it is the tree found by port
        text = px.metrics_text()
        assert metric_value(text, "edge_proxy_energy_source_info", source="estimated", kind="estimated") == 1
        import asyncio
        for _ in range(40):
            text = px.metrics_text()
            if metric_value(text, "edge_proxy_energy_source_info", scope=SCOPE_TREE) == 1:
                break
            await asyncio.sleep(0.1)
        assert metric_value(text, "edge_proxy_energy_source_info", scope=SCOPE_TREE) == 1, text


def test_process_tree_cpu_resolves_below_a_clock_tick(tmp_path: Path) -> None:
    """The tree's busy seconds come from the kernel's nanosecond process clock, not /proc's 10 ms
    ticks: while a child spins, successive reads step by far less than a tick (with tick counting
    every step would be a multiple of 10 ms), so a 2 ms request is not estimated at 0 J."""
    import psutil

    from edge_proxy.energy.process_cpu import ProcessTreeCpu

    stop = tmp_path / "stop"
    child = subprocess.Popen([sys.executable, "-c", BURN.format(stop=str(stop))])
    try:
        tree = ProcessTreeCpu(lambda: child.pid)
        steps: list[float] = []
        last = tree.busy_seconds()
        while len(steps) < 20:
            now = tree.busy_seconds()
            if now > last:
                steps.append(now - last)
                last = now
            else:
                assert now == last              # never goes down
        assert min(steps) < 0.005, steps
        assert psutil.Process(child.pid).is_running()
    finally:
        stop.touch()
        child.wait(timeout=30)
