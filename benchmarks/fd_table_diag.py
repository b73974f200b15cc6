"""``proxy_diagnostics.py fd-table``: socket() latency at each doubling of the kernel's
file-descriptor table, in a process with a second thread, without and with
``edge_proxy.process_tuning.reserve_fd_table``; fresh processes, alternating.

Owns: that measurement (the child program and the table). Must NOT: import the proxy in this process
(each child imports it itself, from the repository root).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from support import ROOT

_FD_CHILD = """
import json, os, socket, sys, threading, time
mode, n = sys.argv[1], int(sys.argv[2])
sys.path.insert(0, sys.argv[3])
def fd_size():
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith("FDSize:")).split()[1])
size0 = fd_size()
if mode == "reserved":
    from edge_proxy.process_tuning import reserve_fd_table
    reserve_fd_table()
size1 = fd_size()
stop = threading.Event()
t = threading.Thread(target=stop.wait)   # the proxy has threads (energy sampler): files shared
t.start()
socks, lat = [], []
try:
    for _ in range(n):
        a = time.perf_counter_ns()
        s = socket.socket()
        lat.append(((time.perf_counter_ns() - a) / 1e6, s.fileno()))
        socks.append(s)
finally:
    stop.set()
    t.join()
print(json.dumps({"fd_size_start": size0, "fd_size_after_reserve": size1, "fd_size_end": fd_size(),
                  "latency_ms_fd": lat}))
"""


def cmd_fd_table(args: argparse.Namespace) -> int:
    """socket() latency as the descriptor table grows, in a process with a second thread, without
    and with reserve_fd_table (edge_proxy.process_tuning), alternating, each in a fresh process."""
    from rich.console import Console
    from rich.table import Table

    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except ImportError:
        soft = 0
    n = min(args.sockets, int(soft) - 16) if soft and soft != resource.RLIM_INFINITY else args.sockets
    if n < 300:
        print(f"fd-table: error: RLIMIT_NOFILE {soft} allows too few sockets to cross a table doubling",
              file=sys.stderr)
        return 2
    doublings = [d for d in (256, 512, 1024, 2048, 4096) if d < n]
    rows = []
    table = Table(title=f"socket() latency (ms) while opening {n} sockets, one other thread alive")
    for col in ("round", "table", "FDSize", *[f"fd {d}" for d in doublings],
                "max other", "median"):
        table.add_column(col, justify="right")
    for rnd in range(args.repeat):
        for mode in ("plain", "reserved"):
            run = subprocess.run([sys.executable, "-c", _FD_CHILD, mode, str(n), str(ROOT)],
                                 capture_output=True, text=True, timeout=300)
            if run.returncode != 0:
                print(f"fd-table: error: child failed: {run.stderr.strip()[-500:]}", file=sys.stderr)
                return 1
            res = json.loads(run.stdout)
            lat = {fd: ms for ms, fd in res["latency_ms_fd"]}
            at = {d: lat.get(d) for d in doublings}
            others = sorted(ms for fd, ms in lat.items() if fd not in at)
            row = {"round": rnd, "mode": mode, "fd_size_start": res["fd_size_start"],
                   "fd_size_after_reserve": res["fd_size_after_reserve"], "fd_size_end": res["fd_size_end"],
                   "at_doubling_ms": at, "max_other_ms": others[-1], "median_ms": others[len(others) // 2]}
            rows.append(row)
            table.add_row(str(rnd), mode, f"{res['fd_size_start']} -> {res['fd_size_end']}",
                          *[f"{at[d]:.3f}" if at[d] is not None else "-" for d in doublings],
                          f"{row['max_other_ms']:.3f}", f"{row['median_ms']:.4f}")
    Console(width=max(Console().width, 110)).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"sockets": n, "cpus": os.cpu_count(), "rows": rows}, indent=1))
    return 0
