"""The split-K reduction of the INT4 Triton GEMM, host side: which reduction runs, and the ticket counters it uses.

:func:`model_server.int4_triton.int4_triton_mm` with ``Config.split_k`` > 1 has every program store its fp32 partial
tile to ``[split, M, N]``; then either (``ticket``, the default) the program that finishes last for an output tile
sums the partials itself, or (``kernel``, the old path) a second kernel sums them; ``auto`` (the default) takes the
ticket up to :data:`TICKET_MAX_ROWS` rows and the kernel above: on an H100 (2026-12-06, ``int4_splitk_bench.py``, raw
``benchmarks/results/2026-12-06-h100/splitk_0513/``) the ticket saved 0.1-0.8 us per split linear at 16 and 32 rows
and cost 0.8-1.1 us at 64, where the last program's read of 4-8 partial 64 x 64 tiles outlasts the launch it saves.
``MODEL_SERVER_INT4_TRITON_SPLIT_REDUCE`` picks (:func:`mode`, read once per process; :func:`reduction` per launch).
Where the sum kernel would run, the fast engine takes the partials instead and adds them in the kernel that reads
the product next (:func:`sum_in_consumer`, on unless ``MODEL_SERVER_INT4_SPLIT_SUM_IN_CONSUMER=0``).

Counters: one int32 per output tile, zeroed once when allocated; each launch leaves them at zero (the last program
of a tile resets its counter), so later launches and CUDA-graph replays reuse them without a memset. A buffer is
shared by launches that run one after another: eager launches use one buffer per device and stream (the fast
engine's background warm-up runs the GEMM on its own stream while the engine serves on another), and launches
captured into CUDA graphs use one buffer per device, so graphs holding the GEMM must be replayed one at a time
(the engine replays on one stream) and never alongside a capture's own replay on another stream. The graph buffer
must be big enough before capture, since nothing can be allocated or zeroed while capturing: :func:`reserve` sizes
it for every default configuration (Int4Linear calls it when built), and every eager launch grows it to what that
launch needed (the engine warms a shape eagerly before capturing it, and the benchmarks do too); a capture that
needs more raises a RuntimeError. A grown buffer's predecessor is kept (a graph captured earlier still points at it).

Owns the switch's modes and the counter buffers. Must NOT launch kernels (``int4_triton`` does).
"""
from __future__ import annotations

import threading
from functools import lru_cache

import torch

from model_server.switches import choice, flag

SWITCH = "MODEL_SERVER_INT4_TRITON_SPLIT_REDUCE"
MODES = ("auto", "ticket", "kernel")     # the first is the default
TICKET_MAX_ROWS = 32                     # auto: the ticket for steps of up to this many rows, the sum kernel above
MIN_TILES = 1024                         # counters per buffer at least (4 KB); default configs need < num_sms

SUM_IN_CONSUMER_SWITCH = "MODEL_SERVER_INT4_SPLIT_SUM_IN_CONSUMER"

_COUNTERS: dict[tuple[str, object], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []        # grown-out buffers: graphs captured earlier may still point at them
_LOCK = threading.Lock()                 # the engine thread and the background warm-up's thread both launch


@lru_cache(maxsize=1)
def mode() -> str:
    """``auto``, ``ticket`` or ``kernel`` from ``MODEL_SERVER_INT4_TRITON_SPLIT_REDUCE`` (unset: ``auto``), read once
    per process (tests clear the cache); another value raises :class:`model_server.switches.SwitchValueError`."""
    return choice(SWITCH, MODES)


def reduction(rows: int, requested: str | None = None) -> str:
    """``ticket`` or ``kernel`` for a launch of ``rows`` rows: ``requested`` (a benchmark's A/B) or the switch's
    mode, ``auto`` resolved by :data:`TICKET_MAX_ROWS`; ValueError for another value."""
    req = requested or mode()
    if req not in MODES:
        raise ValueError(f"split_reduce {req!r} is not one of {MODES}")
    if req == "auto":
        return "ticket" if rows <= TICKET_MAX_ROWS else "kernel"
    return req


@lru_cache(maxsize=1)
def sum_in_consumer() -> bool:
    """:meth:`model_server.int4.Int4Linear.forward_partials` returns a step's fp32 partial sums ``[split, ..., N]``
    where the sum kernel would run, and the fast engine adds them, in split order as the sum kernel does (the same
    bits), in what reads the product next: the residual add + RMSNorm after the o and down projections
    (:func:`model_server.engines.fast.layers.run_layers`) and the decode step's rotary + K/V write after the merged
    q/k/v (:func:`model_server.engines.fast.rope_kv.rope_kv_write`): every one of a 64-row decode step's 48
    sum-kernel launches. On by default (unset or ``1``); ``MODEL_SERVER_INT4_SPLIT_SUM_IN_CONSUMER=0`` keeps the sum
    kernel. On an H100 (docs/benchmarks.md, "INT4 at 64 streams, fourth pass"), with the GLU epilogue, the 64-row
    graph step took 1.384 -> 1.210 ms and 64 concurrent requests' greedy tokens were identical off and on. Read once
    per process; another value raises :class:`model_server.switches.SwitchValueError`."""
    return flag(SUM_IN_CONSUMER_SWITCH) is not False


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _device_key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def _grown(key: tuple[str, object], device: torch.device, tiles: int) -> torch.Tensor:
    """The buffer under ``key`` with at least ``tiles`` counters, allocated (zeroed) or grown here."""
    with _LOCK:
        cur = _COUNTERS.get(key)
        if cur is not None and cur.numel() >= tiles:
            return cur
        new = torch.zeros(max(tiles, MIN_TILES, 0 if cur is None else 2 * cur.numel()), device=device,
                          dtype=torch.int32)
        if cur is not None:
            _RETIRED.append(cur)
        if key[1] == "graph" and device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()     # zeroed before any stream's graph reads it
        _COUNTERS[key] = new
        return new


def counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The zeroed int32 counters (at least ``tiles``) for a launch on ``device`` from the current stream: the
    device's graph buffer while the stream is capturing (RuntimeError when it holds fewer than ``tiles``), else the
    stream's own buffer, after growing the graph buffer to ``tiles`` too (module docstring)."""
    dev = _device_key(device)
    if _capturing(device):
        cur = _COUNTERS.get((dev, "graph"))
        if cur is None or cur.numel() < tiles:
            raise RuntimeError(f"int4 Triton GEMM: a split-K launch of {tiles} output tiles is being captured into "
                               f"a CUDA graph, but the graph's ticket counters hold "
                               f"{0 if cur is None else cur.numel()}; run it once eagerly (or "
                               f"int4_triton_split.reserve) before capture, or set {SWITCH}=kernel")
        return cur
    graph = _COUNTERS.get((dev, "graph"))
    if graph is None or graph.numel() < tiles:
        _grown((dev, "graph"), device, tiles)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    cur = _COUNTERS.get((dev, stream))
    return cur if cur is not None and cur.numel() >= tiles else _grown((dev, stream), device, tiles)


def reserve(device: torch.device | str, num_sms: int) -> None:
    """Size ``device``'s graph counters for every configuration ``int4_triton.choose_config`` picks on a card of
    ``num_sms`` SMs (it splits K only while the output tiles are fewer than the SMs); call outside capture."""
    device = torch.device(device)
    _grown((_device_key(device), "graph"), device, num_sms)
