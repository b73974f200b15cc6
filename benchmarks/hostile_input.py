"""Reliability of the proxy's request path under hostile clients and misbehaving backends.

Starts ``edge-proxy serve`` (its own process, default settings apart from ports and a 2 s
first-byte timeout) in front of a raw-socket HTTP/1.1 backend in this process, whose behaviour is
chosen by the request's prompt: a normal answer echoing the prompt, ``103 Early Hints`` before the
answer, an endless SSE line, no answer at all. Then it tries, and reports as JSON:

- ``bad_inputs``: JSON nested 1,000 deep on every generation route and ``/edge/feedback``,
  aiohttp protocol errors (header line too long, bad and doubled Content-Length, bad request
  line), backend-only routes (``/metrics``, ``/energy``, ``/info``, an admin route): the status
  each got, whether the body was JSON, and the proxy's log lines and tracebacks meanwhile;
- ``mixing``: sequential and concurrent requests to a backend that sends 103 before each answer:
  how many clients got another client's body;
- ``request_ids``: 20 concurrent requests sharing one ``x-request-id``: distinct proxy ids;
- ``slowloris``: N connections trickling a request head and N sending an incomplete body (defaults
  of ``request_header_timeout_seconds`` / ``request_body_timeout_seconds``): time until the proxy
  closed them, their statuses, the in-flight gauge meanwhile, and ``/health`` latency meanwhile;
- ``backend``: a hung backend (seconds to 504) and a 20 MB SSE line (bytes the client got).

Usage: ``python benchmarks/hostile_input.py [--slowloris 1500] [--json OUT.json]``
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from support import ROOT, free_port, stop_process

DEEP = b"[" * 1000 + b"]" * 1000


# ---- the backend ------------------------------------------------------------------------------------
async def _backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            length = 0
            for h in head.decode("latin-1").split("\r\n")[1:]:
                k, _, v = h.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v)
            body = await reader.readexactly(length) if length else b""
            if not line.startswith("POST /v1/"):
                out = b'{"secret":"/models/on/disk"}' if "/health" not in line else b""
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(out), out))
                continue
            req = json.loads(body)
            prompt = str(req.get("prompt", ""))
            if prompt.startswith("hang"):
                await asyncio.sleep(3600)
            if prompt.startswith("hints"):
                writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
            if prompt.startswith("endless"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
                piece = b"x" * (256 * 1024)
                for _ in range(80):
                    writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                    await writer.drain()
                return
            out = json.dumps({"id": "c", "object": "text_completion", "model": "bench",
                              "choices": [{"index": 0, "text": prompt, "finish_reason": "stop"}],
                              "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                        "total_tokens": 2}}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                         % (len(out), out))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


# ---- checks -------------------------------------------------------------------------------------------
async def _raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)
    await w.drain()
    try:
        return await asyncio.wait_for(r.read(), timeout)
    finally:
        w.close()


def _status_json(raw: bytes) -> tuple[int, bool]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    try:
        json.loads(body)
        return status, True
    except ValueError:
        return status, False


async def bad_inputs(url: str, port: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as s:
        for path in ("/v1/chat/completions", "/v1/completions", "/generate", "/generate_stream", "/",
                     "/edge/feedback"):
            async with s.post(url + path, data=DEEP, headers={"Content-Type": "application/json",
                                                              "Authorization": "Bearer bench"}) as r:
                body = await r.read()
                out.append({"input": f"JSON nested 1000 deep -> POST {path}", "status": r.status,
                            "json": _is_json(body)})
        for path in ("/metrics", "/energy", "/info", "/v1/load_lora_adapter"):
            async with s.get(url + path) as r:
                body = await r.read()
                out.append({"input": f"backend-only route GET {path}", "status": r.status,
                            "json": _is_json(body), "leaked": b"secret" in body})
    proto = {
        "header line of 20 KB": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
        "Content-Length: abc": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        "two Content-Length": b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "NUL in request line": b"GET /\x00 HTTP/1.1\r\n\r\n",
    }
    for name, data in proto.items():
        statuses = [_status_json(await _raw(port, data)) for _ in range(50)]
        out.append({"input": f"{name} (x50)", "status": sorted({s for s, _ in statuses}),
                    "json": all(j for _, j in statuses)})
    return out


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
        return True
    except ValueError:
        return False


async def mixing(url: str) -> dict[str, Any]:
    wrong = 0
    n = 0
    async with aiohttp.ClientSession() as s:
        async def one(i: int) -> bool:
            async with s.post(url + "/v1/completions", json={"model": "m", "prompt": f"hints-{i}-end"},
                              timeout=aiohttp.ClientTimeout(total=10)) as r:
                body = await r.read()
                return r.status == 200 and f"hints-{i}-end".encode() in body
        for i in range(100):
            n += 1
            wrong += not await one(i)
        for rnd in range(5):
            res = await asyncio.gather(*(one(1000 + rnd * 20 + i) for i in range(20)))
            n += len(res)
            wrong += sum(not ok for ok in res)
    return {"requests": n, "wrong_or_failed": wrong}


async def request_ids(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s:
        async def one() -> str:
            async with s.post(url + "/v1/completions", json={"model": "m", "prompt": "p"},
                              headers={"x-request-id": "same"}) as r:
                await r.read()
                return r.headers["x-edge-request-id"]
        ids = await asyncio.gather(*(one() for _ in range(20)))
    return {"requests": 20, "distinct_proxy_ids": len(set(ids))}


async def slowloris(url: str, port: int, metrics_url: str, n: int) -> dict[str, Any]:
    t0 = time.monotonic()
    closed: dict[str, list[float]] = {"head": [], "body": []}
    statuses: dict[str, int] = {}

    async def victim(kind: str) -> None:
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            statuses["connect_failed"] = statuses.get("connect_failed", 0) + 1
            return
        if kind == "head":
            w.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        else:
            w.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000\r\n\r\n{\"model\": ")

        async def trickle() -> None:
            try:
                while True:
                    await asyncio.sleep(1.0)
                    w.write(b"X" if kind == "head" else b" ")
                    await w.drain()
            except (ConnectionError, OSError):
                pass
        t = asyncio.create_task(trickle())
        try:
            data = await asyncio.wait_for(r.read(), 200)
            st = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "closed"
        except (asyncio.TimeoutError, ConnectionError):
            st = "still_open_or_reset"
        t.cancel()
        w.close()
        statuses[f"{kind}:{st}"] = statuses.get(f"{kind}:{st}", 0) + 1
        closed[kind].append(time.monotonic() - t0)

    tasks = [asyncio.create_task(victim("head" if i % 2 == 0 else "body")) for i in range(2 * n)]
    in_flight_max = 0.0
    health: list[float] = []
    async with aiohttp.ClientSession() as s:
        while not all(t.done() for t in tasks):
            await asyncio.sleep(1.0)
            t1 = time.monotonic()
            async with s.get(url + "/health") as r:
                await r.read()
            health.append(time.monotonic() - t1)
            async with s.get(metrics_url) as r:
                for line in (await r.text()).splitlines():
                    if line.startswith("edge_proxy_in_flight_requests "):
                        in_flight_max = max(in_flight_max, float(line.split()[1]))
    after = {f"{kind}_closed_after_seconds": {"min": round(min(v), 2), "p50": round(sorted(v)[len(v) // 2], 2),
                                              "max": round(max(v), 2)} for kind, v in closed.items() if v}
    return {"connections": 2 * n, "statuses": statuses, **after, "in_flight_max": in_flight_max,
            "health_ms_p50": round(sorted(health)[len(health) // 2] * 1000, 1),
            "health_ms_max": round(max(health) * 1000, 1)}


async def backend_faults(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        async with s.post(url + "/v1/completions", json={"model": "m", "prompt": "hang", "stream": True}) as r:
            await r.read()
            hung = {"status": r.status, "seconds": round(time.monotonic() - t0, 2)}
        t0 = time.monotonic()
        async with s.post(url + "/v1/completions", json={"model": "m", "prompt": "endless", "stream": True}) as r:
            body = await r.read()
            endless = {"status": r.status, "client_bytes": len(body), "seconds": round(time.monotonic() - t0, 2),
                       "ends_with_error_event": b'"stream_broken"' in body[-300:]}
    return {"hung_backend_stream_first_byte_timeout_2s": hung, "endless_sse_line_20MB": endless}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    server = await asyncio.start_server(_backend, "127.0.0.1", 0)
    bport = server.sockets[0].getsockname()[1]
    port, mport = free_port(), free_port()
    log = tempfile.NamedTemporaryFile(prefix="edge-proxy-", suffix=".log", delete=False)
    env = dict(os.environ, PYTHONPATH=str(ROOT), EDGE_PROXY_ECONOMICS_FEEDBACK_TOKEN="bench")
    proc = subprocess.Popen([sys.executable, "-m", "edge_proxy", "serve", "--backend", f"http://127.0.0.1:{bport}",
                             "--backend-kind", "openai", "--port", str(port), "--metrics-port", str(mport),
                             "--access-log", "none", "--first-byte-timeout", "2"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url, metrics_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{mport}/metrics"
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(300):
                try:
                    async with s.get(url + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        log_start = Path(log.name).stat().st_size
        res: dict[str, Any] = {"bad_inputs": await bad_inputs(url, port)}
        text = Path(log.name).read_bytes()[log_start:].decode("utf-8", "replace")
        res["bad_inputs_log"] = {"lines": len(text.splitlines()), "tracebacks": text.count("Traceback")}
        res["mixing"] = await mixing(url)
        res["request_ids"] = await request_ids(url)
        res["backend"] = await backend_faults(url)
        res["slowloris"] = await slowloris(url, port, metrics_url, args.slowloris)
        res["proxy_alive_after"] = proc.poll() is None
        return res
    finally:
        stop_process(proc, timeout=30)
        server.close()


def main() -> None:
    ap = argparse.ArgumentParser(description="hostile clients and misbehaving backends against edge-proxy")
    ap.add_argument("--slowloris", type=int, default=1500,
                    help="connections of each slowloris kind (trickled heads, incomplete bodies; default 1500)")
    ap.add_argument("--json", type=Path, help="also write the results to this file")
    args = ap.parse_args()
    res = asyncio.run(main_async(args))
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
