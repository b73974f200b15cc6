"""One decode step of a running fast engine, timed alone (its captured CUDA graph replayed, no host loop), once the
engine has gone idle: :func:`drained` and :func:`graph_step_ms`, for benchmarks/steady_state.py and decode_profile.py.
"""
from __future__ import annotations

import asyncio
import statistics
import time

import torch


async def drained(eng, timeout_s: float) -> bool:
    """Wait until the engine has no waiting or running request (polls its stats); False on timeout."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        st = eng.stats()
        await asyncio.sleep(0.05)                            # when idle: the loop's last step returns meanwhile
        if not st.waiting_requests and not st.running_requests:
            return True
    return False


def graph_step_ms(eng, b: int, length: int, device: str) -> float | None:
    """Median device time of one decode step replayed alone (the captured graph, no host loop)."""
    r = eng.runner
    if device != "cuda" or not r.graphs:
        return None
    times = []
    with torch.inference_mode():
        for i in range(60):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            r.decode(b, length)
            e.record()
            e.synchronize()
            if i >= 10:
                times.append(s.elapsed_time(e))
    return round(statistics.median(times), 4)
