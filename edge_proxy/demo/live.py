"""The demo's live run: the cold-start request, then the mixed load with a progress bar and the
live table, scraping /metrics each second, and the final table. Must not start or stop processes
(that is :mod:`.command` and :mod:`.processes`)."""
from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any

from edge_proxy.config import ConfigError
from edge_proxy.demo.load import ClientStats, one_request
from edge_proxy.demo.table import build_rows, build_table, parse_metrics


async def drive(base: str, metrics_url: str, model: str, duration: float, concurrency: int,
                max_tokens: int, console: Any, measured: Any = None,
                after_cold_start: Any = None) -> tuple[ClientStats, dict[str, Any], float]:
    import aiohttp
    from rich.console import Group
    from rich.live import Live
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    stats = ClientStats()
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        with console.status("cold start: the proxy is starting the model server (first request "
                            "is held until it is ready) ..."):
            t0 = time.perf_counter()
            await one_request(session, base, model, 1, stats, max_tokens)
            stats.cold_start_seconds = time.perf_counter() - t0
        if stats.ok == 0:
            raise ConfigError("the first request through the proxy failed (see the logs above)")
        console.print(f"cold start + first request: {stats.cold_start_seconds:.1f} s")
        if after_cold_start is not None:        # measured inputs: edge-eval eval through the proxy
            await asyncio.to_thread(after_cold_start)

        progress = Progress(TextColumn("mixed load"), BarColumn(), TextColumn("{task.completed:.0f}/"
                            "{task.total:.0f} s"), TimeRemainingColumn(), console=console)
        task = progress.add_task("load", total=duration)
        start = time.perf_counter()
        stop_at = start + duration
        metrics: dict[str, list[tuple[dict[str, str], float]]] = {}

        async def worker(i: int) -> None:
            k = i
            while time.perf_counter() < stop_at:
                await one_request(session, base, model, k % 3, stats,
                                  random.randint(max(2, max_tokens // 2), max_tokens))
                k += 1

        async def scrape() -> None:
            nonlocal metrics
            with contextlib.suppress(Exception):
                async with session.get(metrics_url) as resp:
                    metrics = parse_metrics(await resp.text())

        workers = [asyncio.create_task(worker(i)) for i in range(concurrency)]
        with Live(Group(progress, build_table(metrics, stats, model, 0.0, measured)), console=console,
                  refresh_per_second=2, transient=True) as live:
            while not all(w.done() for w in workers):
                await asyncio.sleep(1.0)
                progress.update(task, completed=min(duration, time.perf_counter() - start))
                await scrape()
                live.update(Group(progress, build_table(metrics, stats, model,
                                                        time.perf_counter() - start, measured)))
        await asyncio.gather(*workers)
        await asyncio.sleep(1.0)          # the energy ledger closes the last ticks
        await scrape()
        elapsed = time.perf_counter() - start
        if console.is_terminal:
            console.print(build_table(metrics, stats, model, elapsed, measured))
        else:                       # a log file or a pipe: plain text, no box drawing
            console.file.write(build_rows(metrics, stats, model, elapsed, measured).plain(console.width))
            console.file.flush()
        if measured is None:
            console.print("[dim]configured: the paper's Llama-3.2-1B rag scores (INT4 0.752, FP16 0.742) "
                          "and LoRA fine-tune energy (92,122 J) (--paper-constants). Prices: "
                          "economics.* settings (docs/metrics.md).[/dim]")
        else:
            console.print("[dim]measured: the score behind IPW (edge-eval eval through the proxy) and "
                          "the LoRA adaptation energy behind N_break (edge-eval adapt, cached); Q_ret from the "
                          "served variant's and the unquantized model's scores on the same items. Prices: "
                          "economics.* settings (docs/metrics.md).[/dim]")
    return stats, metrics, elapsed

