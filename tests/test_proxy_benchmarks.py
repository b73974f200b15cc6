"""The proxy benchmarks run end to end (short runs on 127.0.0.1; their numbers are in
docs/benchmarks.md, never asserted here): ``proxy_overhead.py --quick`` gives a complete table and
JSON for every target, and ``proxy_diagnostics.py cpu`` runs proxies side by side, the Python
byte-copy floor and a bare aiohttp reverse proxy among them."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def test_proxy_overhead_quick_covers_every_target_and_cell(tmp_path: Path) -> None:
    out = tmp_path / "cells.json"
    cmd = [sys.executable, str(BENCH / "proxy_overhead.py"), "--quick", "--rounds", "1", "--warmup", "0.2",
           "--core-row", "--json", str(out)]
    cmd += ["--nginx", NGINX] if NGINX else ["--no-nginx"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    cells = json.loads(out.read_text())
    targets = {"direct", "edge-proxy", "edge-proxy core"} | ({"nginx"} if NGINX else set())
    got = {(c["target"], c["stream"], c["concurrency"]) for c in cells}
    assert got == {(t, s, c) for t in targets for s in (True, False) for c in (1, 4)}
    for c in cells:
        assert c["errors"] == 0, c["target"]
        assert c["completed"] > 0 and len(c["e2e"]) > 0
        # one TTFT per measured streamed request, none for whole responses
        assert (len(c["ttft"]) == len(c["e2e"])) if c["stream"] else not c["ttft"]
        # every request takes at least the upstream's 330 ms (20 ms + 31 x 10 ms)
        assert min(c["e2e"]) >= 0.33
    table = [line for line in run.stdout.splitlines() if line.startswith("| stream") or line.startswith("| non-stream")]
    assert len(table) == len(cells)


@pytest.mark.parametrize("stream", [True, False])
def test_proxy_diagnostics_cpu_side_by_side_with_floor(stream: bool) -> None:
    proxy = (f"exec {sys.executable} -m edge_proxy serve --backend {{backend}} --port {{port}} "
             "--metrics-port none --energy-source none --access-log none")
    floor = f"exec {sys.executable} benchmarks/proxy_diagnostics.py tcp-relay --port {{port}} --backend {{backend}}"
    bare = f"exec {sys.executable} benchmarks/proxy_diagnostics.py aiohttp-relay --port {{port}} --backend {{backend}}"
    cmd = [sys.executable, str(BENCH / "proxy_diagnostics.py"), "cpu", "--direct", "--concurrency", "4",
           "--seconds", "0.7", "--rounds", "2", "--target", f"floor={floor}", "--target", f"bare={bare}",
           "--target", f"proxy={proxy}"]
    if stream:
        cmd.append("--stream")
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split() for line in run.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert sorted({r[1] for r in rows}) == ["bare", "direct", "floor", "proxy"]
    assert len(rows) == 8
    for r in rows:
        assert float(r[2]) > 0, r          # requests completed through every target
        e2e_p50 = float(r[5])
        assert e2e_p50 >= 330.0, r         # the upstream's 330 ms, through the floor and the proxy too
        ttft = float(r[4])
        assert (ttft >= 20.0) if stream else ttft != ttft   # TTFT only for streams (NaN otherwise)
    added = run.stdout.split("added vs direct", 1)[1].splitlines()
    assert [line.split()[0] for line in added[2:5]] == ["floor", "bare", "proxy"]


def test_fd_table_diagnostic_runs_both_modes(tmp_path: Path) -> None:
    out = tmp_path / "fd.json"
    run = subprocess.run([sys.executable, str(BENCH / "proxy_diagnostics.py"), "fd-table", "--sockets", "600",
                          "--repeat", "1", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(out.read_text())
    rows = {r["mode"]: r for r in res["rows"]}
    assert set(rows) == {"plain", "reserved"}
    # plain: the table grew as the sockets were opened; reserved: it was grown before the first one
    assert rows["plain"]["fd_size_after_reserve"] == rows["plain"]["fd_size_start"]
    assert rows["plain"]["fd_size_end"] >= res["sockets"]
    assert rows["reserved"]["fd_size_after_reserve"] >= res["sockets"]
    assert rows["reserved"]["fd_size_end"] == rows["reserved"]["fd_size_after_reserve"]
    assert rows["plain"]["at_doubling_ms"]["512"] is not None     # a socket landed on fd 512
    assert "socket() latency" in run.stdout
