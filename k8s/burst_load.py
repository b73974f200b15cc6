#!/usr/bin/env python3
"""Bursts of requests against a deployed gateway, for the scale-from-zero experiment
(docs/kubernetes.md, "Experiment: measure C_tax on a real cluster").

Sends ``--bursts`` bursts of ``--size`` concurrent OpenAI chat requests to ``--url`` (the gateway's
Service, e.g. through ``kubectl port-forward``), pausing ``--pause`` seconds between bursts, so that
with a pause longer than KEDA's cooldown every burst cold-starts the model server. Per burst it
prints how many requests succeeded, how many waited for a cold start (the gateway's
``x-edge-cold-start`` header) and the slowest wait; a 503 with ``Retry-After`` (a gateway replica
draining, or its hold full) is retried once after that delay. At the end it prints a JSON summary.
The cold starts' phases, energy and tax are read from the gateway (``GET /edge/cold-starts``).

    python k8s/burst_load.py --url http://127.0.0.1:8080 --model llama-3.2-1b-nf4 \\
        --bursts 10 --size 20 --pause 300
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import aiohttp


async def one(session: aiohttp.ClientSession, url: str, model: str, max_tokens: int, i: int) -> dict[str, Any]:
    body = {"model": model, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"Write one sentence about the number {i}."}]}
    t0 = time.monotonic()
    for attempt in (0, 1):
        try:
            async with session.post(url + "/v1/chat/completions", json=body) as r:
                await r.read()
                retry = r.headers.get("Retry-After")
                if r.status == 503 and retry is not None and attempt == 0:
                    await asyncio.sleep(float(retry))
                    continue
                return {"status": r.status, "seconds": time.monotonic() - t0,
                        "cold_start": r.headers.get("x-edge-cold-start") == "true",
                        "cold_wait_seconds": float(r.headers.get("x-edge-cold-start-wait-seconds") or 0.0),
                        "retried": attempt == 1}
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return {"status": None, "error": type(exc).__name__, "seconds": time.monotonic() - t0}
    raise AssertionError("unreachable")


async def run(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/")
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    bursts = []
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for b in range(args.bursts):
            if b:
                await asyncio.sleep(args.pause)
            results = await asyncio.gather(*(one(session, url, args.model, args.max_tokens, b * args.size + i)
                                             for i in range(args.size)))
            ok = sum(1 for r in results if r["status"] == 200)
            cold = [r for r in results if r.get("cold_start")]
            line = {"burst": b + 1, "ok": ok, "failed": args.size - ok, "cold_start_requests": len(cold),
                    "max_cold_wait_seconds": round(max((r["cold_wait_seconds"] for r in cold), default=0.0), 3),
                    "max_seconds": round(max(r["seconds"] for r in results), 3),
                    "statuses": sorted({str(r["status"]) for r in results})}
            print(json.dumps(line), flush=True)
            bursts.append(line)
    summary = {"bursts": len(bursts), "requests": args.bursts * args.size,
               "ok": sum(b["ok"] for b in bursts), "bursts_with_cold_start": sum(1 for b in bursts if b["cold_start_requests"])}
    print(json.dumps({"summary": summary}), flush=True)
    return 0 if summary["ok"] == summary["requests"] else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="gateway base URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--model", required=True, help="model name the server serves (--model-name)")
    ap.add_argument("--bursts", type=int, default=10, help="number of bursts (default 10)")
    ap.add_argument("--size", type=int, default=20, help="concurrent requests per burst (default 20)")
    ap.add_argument("--pause", type=float, default=300.0, help="seconds between bursts; longer than KEDA's cooldown (default 300)")
    ap.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (default 32)")
    ap.add_argument("--timeout", type=float, default=900.0, help="per-request timeout in seconds, cold start included (default 900)")
    args = ap.parse_args(argv)
    if args.bursts < 1 or args.size < 1 or args.pause < 0 or args.max_tokens < 1 or args.timeout <= 0:
        print("burst_load.py: --bursts, --size, --max-tokens >= 1, --pause >= 0, --timeout > 0", file=sys.stderr)
        return 2
    if not args.url.startswith(("http://", "https://")):
        print(f"burst_load.py: --url must be http(s)://HOST:PORT, got {args.url!r}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
