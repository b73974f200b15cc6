"""energy_validation.py check 5: the sampler's overhead on decode inter-token latency, measured at the
client directly against the model server, in alternating blocks with a sampler off and on, and one
block with the model server's own /energy sampler on; |ITL_on / ITL_off - 1| < 2 %.

Owns: that check. Must NOT: go through the proxy (the check is about the sampler alone).
"""
from __future__ import annotations

import argparse
import statistics
from typing import Any

from energy_validation_clients import http_json, itl_block
from energy_validation_run import make_reader
from support import pct


async def check5_overhead(args: argparse.Namespace, ms_url: str, model: str, uuids: list[str]) -> dict[str, Any]:
    from edge_proxy.energy.sampler import Sampler

    blocks = 3 if args.quick else 5
    secs = 1.5 if args.quick else 4.0
    tokens = 32 if args.quick else 128
    streams = 4
    off: list[float] = []
    on: list[float] = []
    per_block: list[dict[str, Any]] = []
    await itl_block(ms_url, model, streams, tokens, min(2.0, secs), "warm")
    for b in range(blocks):
        for mode in ("off", "on"):
            sampler = None
            if mode == "on":
                reader = make_reader(args.source, uuids, args)
                if reader is not None:
                    sampler = Sampler(reader, args.period)
                    sampler.start()
            try:
                gaps = await itl_block(ms_url, model, streams, tokens, secs, f"itl-{mode}-{b}")
            finally:
                if sampler is not None:
                    sampler.stop()
            (on if mode == "on" else off).extend(gaps)
            per_block.append({"block": b, "sampler": mode, "itl_median_s": pct(gaps, 0.5), "n": len(gaps)})
    out: dict[str, Any] = {"blocks": per_block, "streams": streams, "tokens": tokens, "block_seconds": secs,
                           "itl_off_median_s": pct(off, 0.5), "itl_on_median_s": pct(on, 0.5),
                           "itl_off_mean_s": statistics.fmean(off) if off else None,
                           "itl_on_mean_s": statistics.fmean(on) if on else None}
    out["ratio_median"] = out["itl_on_median_s"] / out["itl_off_median_s"] if off and on else None
    out["ratio_mean"] = (out["itl_on_mean_s"] / out["itl_off_mean_s"]) if off and on else None
    # the model server's own /energy sampler (started by the first GET /energy; cannot be stopped)
    try:
        info = http_json(ms_url + "/energy")
    except OSError:
        info = {"source": "none"}
    if info.get("source") not in (None, "none"):
        gaps = await itl_block(ms_url, model, streams, tokens, secs, "itl-ms-on")
        out["itl_model_server_sampler_on_median_s"] = pct(gaps, 0.5)
        out["ratio_model_server_sampler_median"] = pct(gaps, 0.5) / out["itl_off_median_s"]
    else:
        out["model_server_sampler"] = f"not measured (/energy source {info.get('source')!r})"
    ratios = [r for r in (out.get("ratio_median"), out.get("ratio_model_server_sampler_median")) if r]
    worst = max(abs(r - 1) for r in ratios) if ratios else None
    out["worst_relative_difference"] = worst
    out["pass"] = worst is not None and worst < 0.02
    return out
