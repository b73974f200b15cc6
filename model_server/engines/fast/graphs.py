"""CUDA graphs for the fast engine's :class:`~.runner.ModelRunner`: capture at start, or lazily on first use.

Owns graph capture: an eager warm-up of every shape on a side stream, then one graph per (batch
bucket, length bucket) for decode and one per prefill bucket for prefill, each kind in its own
memory pool; lazy capture records a bucket's graph after its first eager step (mixed steps, which
prefill inside a decode step, are only ever captured lazily, in their own pool). A failed capture
leaves that kind eager and keeps the reason on the runner (``graph_error``, ``prefill_graph_error``).
It must not choose buckets or run the model except through the runner's forward functions.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .runner import ModelRunner

log = logging.getLogger(__name__)


def capture_decode(runner: "ModelRunner") -> None:
    """Capture one decode graph per (batch bucket, length bucket), largest first, sharing one pool.

    If capture fails (e.g. a kernel that cannot be captured), graphs stay off and decode runs
    eagerly; the reason is kept in ``graph_error``.
    """
    if not runner.use_graphs:
        return
    t0 = time.monotonic()
    runner.in_ids.zero_()
    runner.in_pos.zero_()
    stream = torch.cuda.Stream(device=runner.device)
    stream.wait_stream(torch.cuda.current_stream(runner.device))
    pool = None
    try:
        with torch.cuda.stream(stream):
            for b in runner.batch_buckets:          # eager warm-up of every shape (library handles,
                for length in runner.length_buckets:  # algorithm choices) before any capture
                    runner.decode_and_pick(b, length)
        torch.cuda.current_stream(runner.device).wait_stream(stream)
        torch.cuda.synchronize(runner.device)
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(runner.batch_buckets):
            for length in reversed(runner.length_buckets):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    out = runner.decode_and_pick(b, length)
                runner.graphs[(b, length)] = (g, out)
        torch.cuda.synchronize(runner.device)
    except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
        runner.graphs.clear()
        runner.use_graphs = False
        runner.graph_error = f"{type(exc).__name__}: {exc}"
        log.warning("CUDA graph capture failed, decoding eagerly: %s", runner.graph_error)
        try:
            torch.cuda.synchronize(runner.device)
        except Exception:  # noqa: BLE001
            pass
    runner.capture_seconds = time.monotonic() - t0


def capture_prefill(runner: "ModelRunner") -> None:
    """Capture one prefill graph per prefill bucket (own memory pool). On failure prefill stays eager
    (the reason is kept in ``prefill_graph_error``); decode graphs are unaffected."""
    if not (runner.use_graphs and runner.bucketed_prefill and runner.prefill_buckets):
        return
    t0 = time.monotonic()
    runner.p_ids.zero_()
    runner.p_slots.fill_(runner.scratch_slot)
    runner.p_last.zero_()
    stream = torch.cuda.Stream(device=runner.device)
    stream.wait_stream(torch.cuda.current_stream(runner.device))
    try:
        with torch.cuda.stream(stream):
            for nb, tb in runner.prefill_buckets:
                runner.prefill_static(nb, tb)
        torch.cuda.current_stream(runner.device).wait_stream(stream)
        torch.cuda.synchronize(runner.device)
        pool = torch.cuda.graph_pool_handle()
        for nb, tb in sorted(runner.prefill_buckets, key=lambda b: -b[0] * b[1]):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = runner.prefill_static(nb, tb)
            runner.prefill_graphs[(nb, tb)] = (g, out)
        torch.cuda.synchronize(runner.device)
    except Exception as exc:  # noqa: BLE001 - prefill then runs eagerly
        runner.prefill_graphs.clear()
        runner.bucketed_prefill = False
        runner.prefill_graph_error = f"{type(exc).__name__}: {exc}"
        log.warning("prefill graph capture failed, prefill runs eagerly: %s", runner.prefill_graph_error)
        try:
            torch.cuda.synchronize(runner.device)
        except Exception:  # noqa: BLE001
            pass
    runner.capture_seconds += time.monotonic() - t0


def capture_lazily(runner: "ModelRunner", kind: str, key: tuple[int, ...], fn) -> None:
    """Record ``fn`` as the graph for ``key`` (nothing runs: capture only records the kernels). On
    failure lazy capture stops (for ``mixed`` steps: their graphs stop) and that kind runs eagerly from
    then on."""
    t0 = time.monotonic()
    table = {"decode": runner.graphs, "prefill": runner.prefill_graphs, "mixed": runner.mixed_graphs}[kind]
    try:
        if kind not in runner.lazy_pools:
            runner.lazy_pools[kind] = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=runner.lazy_pools[kind]):
            out = fn()
        table[key] = (g, out)
    except Exception as exc:  # noqa: BLE001 - keep serving eagerly
        err = f"{type(exc).__name__}: {exc}"
        if kind == "mixed":
            runner.mixed_graphs_on = False
        else:
            runner.lazy_graphs = False
        if kind in ("decode", "mixed"):
            runner.graph_error = err
        else:
            runner.prefill_graph_error = err
        log.warning("lazy %s graph capture failed, running eagerly: %s", kind, err)
    runner.capture_seconds += time.monotonic() - t0
