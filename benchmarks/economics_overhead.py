"""Cost of live economics inside the proxy: per-request observer time and /metrics scrape time.

Drives :class:`edge_proxy.economics.live.EconomicsObserver` directly with synthetic finished
requests (no network), side by side with a no-op observer, and times a scrape of its registry as
the window fills. Prints a table; ``--out DIR`` also writes economics_overhead.json.

    python benchmarks/economics_overhead.py [--requests 50000] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from edge_proxy.config import load_settings
from edge_proxy.economics.live import EconomicsObserver
from edge_proxy.proxy.hooks import BaseObserver, EnergyAttribution, RequestRecord


def _drive(obs: BaseObserver, n: int, models: int) -> float:
    """Seconds per request for start/end/final on ``obs``."""
    t0 = time.perf_counter()
    for i in range(n):
        rec = RequestRecord(request_id=f"r{i}", route="/v1/completions", api="openai",
                            model=f"m{i % models}", t_received_ns=time.monotonic_ns())
        obs.on_request_start(rec)
        rec.t_end_ns = time.monotonic_ns()
        rec.input_tokens, rec.output_tokens, rec.outcome = 100, 50, "ok"
        rec.energy = EnergyAttribution(1.0, 2.0, "nvml", provisional=False)
        obs.on_request_end(rec)
        obs.on_request_final(rec)
    return (time.perf_counter() - t0) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=50_000, help="synthetic requests (default 50000)")
    ap.add_argument("--out", default=None, help="directory for economics_overhead.json")
    args = ap.parse_args()
    if args.requests < 100:
        ap.error("--requests must be >= 100")
    rows = []
    for models in (1, 8):
        settings = load_settings(environ={}, overrides={("economics", "setup_usd"): 1.0})
        reg = CollectorRegistry()
        obs = EconomicsObserver(settings, reg)
        base = _drive(BaseObserver(), args.requests, models)
        per_req = _drive(obs, args.requests, models)
        scrapes = []
        for _ in range(20):
            t0 = time.perf_counter()
            generate_latest(reg)
            scrapes.append(time.perf_counter() - t0)
        rows.append({"models": models, "requests_in_window": args.requests,
                     "noop_observer_us_per_request": base * 1e6,
                     "economics_us_per_request": per_req * 1e6,
                     "added_us_per_request": (per_req - base) * 1e6,
                     "scrape_ms_median": statistics.median(scrapes) * 1e3})
    print(f"{'models':>6} {'window reqs':>11} {'no-op µs/req':>13} {'economics µs/req':>17} "
          f"{'added µs/req':>13} {'scrape ms':>10}")
    for r in rows:
        print(f"{r['models']:>6} {r['requests_in_window']:>11} {r['noop_observer_us_per_request']:>13.2f} "
              f"{r['economics_us_per_request']:>17.2f} {r['added_us_per_request']:>13.2f} "
              f"{r['scrape_ms_median']:>10.2f}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "economics_overhead.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
