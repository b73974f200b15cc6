"""Diagnostics behind docs/benchmarks.md "Proxy overhead" (CPU only, no GPU).

Subcommands:

- ``cpu``: proxies side by side against one local upstream (the one of ``proxy_overhead.py``),
  alternating, closed-loop load: the proxy process's CPU seconds per completed request (from /proc)
  TTFT p50 and end-to-end p50/p99 (``--direct``: the upstream itself as a row, and each target's
  added latency vs it, same round). Each ``--target NAME=COMMAND`` is a shell command with ``{port}`` and
  ``{backend}`` placeholders, e.g. two checkouts of the proxy:
  ``--target before="cd /tmp/old && python -m edge_proxy serve --backend {backend} --port {port}
  --metrics-port none --energy-source none --access-log none"``.
- ``cold-cache``: the same Python work (a JSON parse loop) back to back and after idle waits of
  0.1-50 ms, median per call; pure arithmetic for comparison.
- ``tcp-relay``: the floor for a Python proxy, to run as a ``cpu`` target: each client connection
  gets its own backend connection and bytes are copied both ways as they arrive (uvloop, nothing
  parsed, nothing measured).
- ``aiohttp-relay``: a bare aiohttp reverse proxy (no parsing, no accounting), to run as a ``cpu``
  target: what the framework alone costs.
- ``fd-table``: socket() latency at each doubling of the kernel's file-descriptor table, in a
  process with a second thread (where each doubling waits an RCU grace period), without and with
  ``edge_proxy.process_tuning.reserve_fd_table``; fresh processes, alternating.
- ``event-cost``: our per-event code on the streaming path in-process (de-chunking, SSE framing,
  token accounting, the write to a stub transport), hot, per event.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import proxy_overhead as po  # noqa: E402
from fake_backend import start_upstream  # noqa: E402
from fd_table_diag import cmd_fd_table  # noqa: E402
from nginx_target import start_nginx  # noqa: E402
from relay_floors import cmd_aiohttp_relay, cmd_tcp_relay  # noqa: E402
from support import child_pids, cpu_seconds, free_port, pct, stop_all, use_uvloop, wait_http_ok  # noqa: E402

def cmd_cpu(args: argparse.Namespace) -> int:
    use_uvloop()
    procs: list[subprocess.Popen] = []
    try:
        up, up_port = start_upstream(Path(po.__file__), args.tokens, args.first_token_ms, args.token_interval_ms,
                                     procs)
        targets: list[tuple[str, int, subprocess.Popen]] = []
        if args.direct:
            targets.append(("direct", up_port, up))
        if args.nginx:
            tmp = Path(tempfile.mkdtemp(prefix="edge-diag-nginx-"))
            ng, nport = start_nginx(args.nginx, tmp, up_port, procs)
            targets.append(("nginx", nport, ng))
        for spec in args.target:
            name, _, command = spec.partition("=")
            port = free_port()
            p = subprocess.Popen(command.format(port=port, backend=f"http://127.0.0.1:{up_port}"),
                                 shell=True, cwd=ROOT, stderr=subprocess.DEVNULL, start_new_session=True)
            procs.append(p)
            wait_http_ok(f"http://127.0.0.1:{port}/health", proc=p)
            targets.append((name, port, p))
        rows: dict[str, list[tuple[float, float, float, float, float]]] = {n: [] for n, _, _ in targets}
        print(f"{'round':>5} {'target':12} {'req/s':>7} {'CPU us/req':>10} {'TTFT p50 ms':>11} "
              f"{'e2e p50 ms':>10} {'e2e p99 ms':>10}")
        for rnd in range(args.rounds):
            for name, port, p in targets:
                cell = po.Cell(name, args.stream, args.concurrency)
                pids = child_pids(p.pid)
                pids += [k for pid in pids[1:] for k in child_pids(pid)]
                c0 = cpu_seconds(pids)
                asyncio.run(po.run_cell(f"http://127.0.0.1:{port}/v1/chat/completions", args.stream,
                                        args.concurrency, args.seconds, 0.3, cell))
                cpu = cpu_seconds(pids) - c0
                row = (cell.rps, 1e6 * cpu / max(1, cell.completed), pct(cell.ttft, .5) * 1e3,
                       pct(cell.e2e, .5) * 1e3, pct(cell.e2e, .99) * 1e3)
                rows[name].append(row)
                print(f"{rnd:>5} {name:12} {row[0]:7.0f} {row[1]:10.0f} {row[2]:11.2f} {row[3]:10.2f} "
                      f"{row[4]:10.2f}", flush=True)
        if args.direct:
            # per round: target minus direct in the same round, then the median over rounds
            print(f"\nadded vs direct (median over {args.rounds} rounds of the same-round difference), ms")
            print(f"{'target':12} {'TTFT p50':>9} {'e2e p50':>9} {'e2e p99':>9}")
            for name, _, _ in targets[1:]:
                diffs = [[r[i] - d[i] for r, d in zip(rows[name], rows["direct"])] for i in (2, 3, 4)]
                print(f"{name:12} " + " ".join(f"{pct(x, .5):9.2f}" for x in diffs))
        return 0
    finally:
        stop_all(procs)


def cmd_cold_cache(args: argparse.Namespace) -> int:
    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}], "stream": False}).encode()

    def parse() -> None:
        for _ in range(20):
            json.loads(body)

    def arith() -> None:
        x = 0
        for i in range(2000):
            x += i * i

    def median_us(fn, pause: float) -> float:
        xs = []
        for _ in range(args.n):
            if pause:
                time.sleep(pause)
            t = time.perf_counter_ns()
            fn()
            xs.append(time.perf_counter_ns() - t)
        xs.sort()
        return xs[len(xs) // 2] / 1e3

    print(f"{'idle wait before':>16} {'JSON parse x20 us':>18} {'arithmetic us':>14}")
    for pause in (0.0, 0.0001, 0.001, 0.005, 0.02, 0.05):
        print(f"{pause * 1e3:13.1f} ms {median_us(parse, pause):18.1f} {median_us(arith, pause):14.1f}")
    return 0


def cmd_event_cost(args: argparse.Namespace) -> int:
    from edge_proxy.proxy.relay import relay_chunk as _relay_chunk
    from edge_proxy.proxy.hooks import RequestRecord
    from edge_proxy.proxy.raw_http import _BackendProtocol
    from edge_proxy.proxy.sse import SSESplitter
    from edge_proxy.proxy.token_accounting import OpenAIStream

    ev = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"bench",'
          b'"choices":[{"index":0,"delta":{"content":" tok7"},"finish_reason":null}]}\n\n')
    chunk = b"%x\r\n%b\r\n" % (len(ev), ev)

    class StubTransport:
        def write(self, data: bytes) -> None:
            pass

        def get_write_buffer_size(self) -> int:
            return 0

    async def main() -> float:
        proto = _BackendProtocol(asyncio.get_running_loop())
        proto.in_head, proto.mode = False, "chunked"
        rec = RequestRecord(request_id="x", route="/v1/chat/completions", api="openai")

        def tokens(n: int, t: int) -> None:
            if rec.t_first_token_ns is None:
                rec.t_first_token_ns = t
            rec.t_last_token_ns = t
            rec.token_times_ns.append(t)

        acct, splitter, tr = OpenAIStream(rec, False, tokens), SSESplitter(), StubTransport()

        def on_data(data: bytes, t: int) -> None:
            out = _relay_chunk(splitter, acct, data, t)
            if out is not None:
                tr.write(b"%x\r\n%b\r\n" % (len(out), out))
                tr.get_write_buffer_size()

        proto.sink = on_data
        t0 = time.perf_counter()
        for i in range(args.n):
            proto.data_received(chunk)
            if i % 1000 == 0:
                rec.token_times_ns.clear()
        return (time.perf_counter() - t0) / args.n

    print(f"per relayed event (hot, in-process): {asyncio.run(main()) * 1e6:.2f} us")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cpu", help="CPU per request of proxies side by side")
    c.add_argument("--target", action="append", default=[], help="NAME=COMMAND ({port}, {backend})")
    c.add_argument("--stream", action="store_true")
    c.add_argument("--direct", action="store_true",
                   help="also measure the upstream itself (row 'direct'; its CPU column is the upstream's) "
                        "and print each target's added latency")
    c.add_argument("--nginx", metavar="PATH", help="also measure nginx (this binary) as a plain reverse proxy")
    c.add_argument("--concurrency", type=int, default=64)
    c.add_argument("--seconds", type=float, default=5.0, help="per target and round")
    c.add_argument("--rounds", type=int, default=3)
    c.add_argument("--tokens", type=int, default=32)
    c.add_argument("--first-token-ms", type=float, default=20.0)
    c.add_argument("--token-interval-ms", type=float, default=10.0)
    k = sub.add_parser("cold-cache", help="Python work after idle waits vs back to back")
    k.add_argument("--n", type=int, default=200)
    e = sub.add_parser("event-cost", help="our per-event streaming code, in-process")
    e.add_argument("--n", type=int, default=100_000)
    r = sub.add_parser("tcp-relay", help="a floor to compare with: bytes copied both ways, nothing parsed "
                                         "(use as a cpu --target)")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--backend", required=True, help="http://HOST:PORT")
    r.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    b = sub.add_parser("aiohttp-relay", help="a bare aiohttp reverse proxy, nothing of ours in it "
                                             "(use as a cpu --target)")
    b.add_argument("--port", type=int, required=True)
    b.add_argument("--backend", required=True, help="http://HOST:PORT")
    f = sub.add_parser("fd-table", help="socket() latency at descriptor-table doublings, without and with "
                                        "the proxy's up-front reservation")
    f.add_argument("--sockets", type=int, default=2100, help="sockets each child opens (bounded by RLIMIT_NOFILE)")
    f.add_argument("--repeat", type=int, default=2, help="rounds of (plain, reserved)")
    f.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = ap.parse_args()
    return {"cpu": cmd_cpu, "cold-cache": cmd_cold_cache, "event-cost": cmd_event_cost,
            "tcp-relay": cmd_tcp_relay, "fd-table": cmd_fd_table,
            "aiohttp-relay": cmd_aiohttp_relay}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
