"""Engine-side measurement for engine_throughput.py and steady_state.py: the NVML energy counter of
the card, device-copy bandwidth, KV bytes per token, and one closed-loop cell against an engine
(aggregate tokens/s, TTFT and ITL percentiles at the consumer).

Owns: those measurements. Must NOT: build models or engines, or write result files.
"""
from __future__ import annotations

import asyncio
import gc
import random
import statistics
import time

import torch

from model_server.engines.base import GenerationRequest, SamplingParams
from support import percentile


class Energy:
    """NVML total-energy counter of the device (millijoules); None when unavailable."""

    def __init__(self, device_index: int = 0) -> None:
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.pynvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except Exception:
            self.handle = None

    def millijoules(self) -> int | None:
        if self.handle is None:
            return None
        try:
            return int(self.pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))
        except Exception:
            return None

    def used_bytes(self) -> int | None:
        if self.handle is None:
            return None
        try:
            return int(self.pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)
        except Exception:
            return None

    def name(self) -> str:
        if self.handle is None:
            return "cpu"
        try:
            n = self.pynvml.nvmlDeviceGetName(self.handle)
            return n.decode() if isinstance(n, bytes) else str(n)
        except Exception:
            return "unknown"


def copy_bandwidth_bytes_per_s(device: str) -> float | None:
    """Device-to-device copy of 1 GiB, counting bytes read plus written (median of 10)."""
    if device != "cuda":
        return None
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / statistics.median(times)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


async def closed_loop(engine, prompts: list[list[int]], concurrency: int, new_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    ttft: list[float] = []
    itl: list[float] = []
    n_tokens = 0
    errors: list[str] = []
    reasons: dict[str, int] = {}

    async def one(i: int, prompt: list[int]) -> None:
        nonlocal n_tokens
        async with sem:
            t_sub = time.monotonic()
            last = None
            req = GenerationRequest(f"b{i}-{random.getrandbits(40)}", prompt,
                                    SamplingParams(max_new_tokens=new_tokens, ignore_eos=True),
                                    arrival_ns=time.monotonic_ns())
            async for ev in engine.submit(req):
                now = time.monotonic()
                if ev.token_id is not None:
                    n_tokens += 1
                    if last is None:
                        ttft.append(now - t_sub)
                    else:
                        itl.append(now - last)
                    last = now
                if ev.finish_reason is not None:
                    reasons[ev.finish_reason] = reasons.get(ev.finish_reason, 0) + 1
                    if ev.error:
                        errors.append(ev.error)

    t0 = time.monotonic()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    wall = time.monotonic() - t0
    return {"wall_seconds": wall, "output_tokens": n_tokens, "tokens_per_second": n_tokens / wall,
            "ttft_p50_ms": _ms(percentile(ttft, 0.50)), "ttft_p99_ms": _ms(percentile(ttft, 0.99)),
            "itl_p50_ms": _ms(percentile(itl, 0.50)), "itl_p99_ms": _ms(percentile(itl, 0.99)),
            "finish_reasons": reasons, "errors": errors[:3]}


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1e3, 3)


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def kv_bytes_per_token(model) -> int:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = 2 if model.dtype in (torch.bfloat16, torch.float16) or getattr(model, "is_loaded_in_4bit", False) else 4
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elem
