"""The proxy benchmarks run end to end (short runs on 127.0.0.1; their numbers are in
docs/benchmarks.md, never asserted here): ``proxy_overhead.py --quick`` gives a complete table and
JSON for every target, with every request's noise-cancelled transit (transit.py) per interleaved
round, and ``proxy_diagnostics.py cpu`` runs proxies side by side, the Python byte-copy floor and a
bare aiohttp reverse proxy among them."""
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


def _p50(xs: list[float]) -> float:
    v = sorted(xs)
    return v[int(round(0.5 * (len(v) - 1)))]


def test_proxy_overhead_quick_covers_every_target_and_cell(tmp_path: Path) -> None:
    out = tmp_path / "cells.json"
    cmd = [sys.executable, str(BENCH / "proxy_overhead.py"), "--quick", "--seconds", "1.6", "--rounds", "2", "--concurrency", "4",
           "--core-row", "--json", str(out)]
    cmd += ["--nginx", NGINX] if NGINX else ["--no-nginx"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    cells = json.loads(out.read_text())
    targets = {"direct", "edge-proxy", "edge-proxy core"} | ({"nginx"} if NGINX else set())
    got = {(c["target"], c["stream"], c["concurrency"]) for c in cells}
    assert got == {(t, s, 4) for t in targets for s in (True, False)}
    by = {(c["target"], c["stream"]): c for c in cells}
    for c in cells:
        assert c["errors"] == 0, c["target"]
        assert c["completed"] > 0 and len(c["e2e"]) > 0
        # one TTFT per measured streamed request, none for whole responses
        assert (len(c["ttft"]) == len(c["e2e"])) if c["stream"] else not c["ttft"]
        # every request takes at least the upstream's 330 ms (20 ms + 31 x 10 ms)
        assert min(c["e2e"]) >= 0.33
        # transit: one per request, every response stamped; the client's time minus the upstream's own
        # (>= 330 ms to its last write, >= 20 ms to its first), never below zero; the request leg is
        # part of it
        assert c["unstamped"] == 0
        assert len(c["e2e_transit"]) == len(c["request_leg"]) == len(c["e2e"])
        assert len(c["ttft_transit"]) == len(c["ttft"])
        for e2e, tr, leg in zip(c["e2e"], c["e2e_transit"], c["request_leg"]):
            assert 0 <= leg <= tr <= e2e - 0.33 + 1e-6, (c["target"], e2e, tr, leg)
        for ttft, tr, leg in zip(c["ttft"], c["ttft_transit"], c["request_leg"]):
            assert 0 <= leg <= tr <= ttft - 0.02 + 1e-6, (c["target"], ttft, tr, leg)
        # interleaving: two rounds (0.8 s each) per target and cell, each with measured requests
        ends = c["round_ends"]
        assert len(ends) == 2 and 0 < ends[0] < ends[1] == len(c["e2e"]), ends
        if c["stream"]:
            assert c["ttft_round_ends"] == ends
        # added transit: pooled = median transit - direct's, and one value per round
        d = by[("direct", c["stream"])]
        if c["target"] == "direct":
            assert not c["added_transit"]
            continue
        metrics = {"e2e": ("e2e_transit", "round_ends")} | (
            {"ttft": ("ttft_transit", "ttft_round_ends")} if c["stream"] else {})
        assert set(c["added_transit"]) == set(metrics)
        for m, (field, ends_field) in metrics.items():
            a = c["added_transit"][m]
            assert a["pooled"] == pytest.approx(_p50(c[field]) - _p50(d[field]), abs=1e-12)
            assert len(a["per_round"]) == 2
            e0, d0 = c[ends_field][0], d[ends_field][0]
            assert a["per_round"][0] == pytest.approx(_p50(c[field][:e0]) - _p50(d[field][:d0]), abs=1e-12)
            lo, hi = a["ci"]
            assert lo <= hi
    if NGINX:
        for s in (True, False):
            v = by[("edge-proxy", s)]["verdict_vs_nginx"]
            assert set(v) == ({"e2e", "ttft"} if s else {"e2e"})
            assert set(v.values()) <= {"met", "not met", "unresolved"}
    table = [line for line in run.stdout.splitlines() if line.startswith("| stream") or line.startswith("| non-stream")]
    assert len(table) == 2 * len(cells)      # the old table and the transit table
    assert ("vs 2x nginx's" in run.stdout) == bool(NGINX)


def test_transit_stamps_and_verdict() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import transit
    finally:
        sys.path.remove(str(BENCH))
    stream_tail = b'data: {"x": 1}\n\n' + transit.stamp_comment(10, 20, 40) + b"data: [DONE]\n\n"
    assert transit.parse_stamps(stream_tail) == (10, 20, 40)
    assert transit.parse_stamps(transit.stamp_header(10, 30)) == (10, 30, 30)
    assert transit.parse_stamps(None) is None and transit.parse_stamps("1 2") is None
    assert transit.parse_stamps("3 2 1") is None          # out of order: not a stamp
    # client: sent at 1.0 s, first data at 1.05, end at 1.5; upstream: 2 ms after the send it got the
    # request, first write 40 ms later, last 440 ms later
    t = transit.transit(1.0, 1.05, 1.5, (1_002_000_000, 1_042_000_000, 1_442_000_000))
    assert t.ttft == pytest.approx(0.01) and t.e2e == pytest.approx(0.06) and t.request_leg == pytest.approx(0.002)
    a = transit.added([2.0, 2.0, 3.0, 3.0], [2, 4], [1.0, 1.0, 1.0, 1.0], [2, 4])
    assert a.per_round == [1.0, 2.0] and a.pooled == 2.0      # nearest rank: median of 2, 2, 3, 3 is 3
    ref = transit.Added(1.0, [0.9, 1.1], (0.8, 1.2))
    assert transit.verdict(transit.Added(1.5, [1.5, 1.6], (1.4, 1.6)), ref) == "met"
    assert transit.verdict(transit.Added(3.0, [2.9, 3.1], (2.5, 3.5)), ref) == "not met"
    assert transit.verdict(transit.Added(2.0, [1.9, 2.1], (1.5, 2.5)), ref) == "unresolved"


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
