"""Prefetching a layer's INT4 weights into the GPU's L2 cache ahead of the kernel that reads them.

An INT4 decoder layer of the 1B preset holds ~30 MB of 4-bit weights (q/k/v 3.1, o 2.1, gate/up 16.8, down 8.4 MB
with scales), less than an H100's 50 MB L2; a bf16 layer (~61 MB) does not fit. So while one INT4 linear runs, the
next one's weights can be pulled into L2 by the copy engine of the SM's TMA unit (``cp.async.bulk.prefetch.L2``,
sm_90; a fire-and-forget request: the issuing thread does not wait for the bytes), and the next kernel then reads
them from L2 instead of HBM. The W4A16 kernels at decode sizes are bound by the latency of their dependent loads
(docs/benchmarks.md, "What bounds the kernel at 64 rows"), which L2 shortens.

``MODEL_SERVER_INT4_L2_PREFETCH`` (:func:`mode`): ``off`` (default until measured), ``inline`` (the prefetch kernel
on the step's stream before each INT4 linear, for the next one), ``side`` (on a second stream forked from the step's
before the linear and joined after it: the prefetch is off the step's critical path, also inside a CUDA graph).

Owns: the prefetch kernel (:func:`prefetch`, Triton with one inline PTX instruction per 64 KB chunk), whether it can
run here (:func:`usable`), which buffers an INT4 linear reads at a given row count (:func:`weight_buffers`) and the
fork / join around a linear (:func:`ahead`, :func:`join`) and the links between linears (:func:`link`). Must NOT decide the order of the linears (the engine's
factory chains them, ``Int4Linear.l2_next``) or change any result: a prefetch moves no data the kernels see.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from typing import Any

import torch

from model_server import switches

CHUNK = 64 * 1024                # bytes per bulk prefetch (a multiple of 16)
LANES = 32                       # chunks per program: one per thread of a one-warp program
MAX_BUFFERS = 3                  # an INT4 linear's words/packed, scales, zeros
MAX_ROWS = 64                    # steps of more rows (prefill) prefetch nothing: compute-bound
MODES = ("off", "inline", "side")
SWITCH = "MODEL_SERVER_INT4_L2_PREFETCH"


def mode() -> str:
    """``MODEL_SERVER_INT4_L2_PREFETCH`` (module docstring); a bad value raises :class:`switches.SwitchValueError`."""
    return switches.choice(SWITCH, MODES)


@lru_cache(maxsize=1)
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["a0", "n0", "a1", "n1", "a2", "n2", "p1", "p2"])   # one compile for every launch
    def _prefetch_kernel(a0, n0, a1, n1, a2, n2, p1, p2, CHUNK_B: tl.constexpr, LANES_N: tl.constexpr):
        """Programs [0, p1) prefetch buffer 0 (address a0, n0 bytes), [p1, p2) buffer 1, [p2, grid) buffer 2; each
        program LANES_N chunks of CHUNK_B bytes, one per thread (a chunk past the buffer's end is skipped)."""
        pid = tl.program_id(0)
        first = tl.where(pid < p1, 0, tl.where(pid < p2, p1, p2))
        base = tl.where(pid < p1, a0, tl.where(pid < p2, a1, a2))
        nbytes = tl.where(pid < p1, n0, tl.where(pid < p2, n1, n2))
        offs = ((pid - first) * LANES_N + tl.arange(0, LANES_N)).to(tl.int64) * CHUNK_B
        size = tl.maximum(tl.minimum(nbytes - offs, CHUNK_B), 0).to(tl.int32)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [base + offs, size], dtype=tl.int32, is_pure=False, pack=1)

    return _prefetch_kernel


@lru_cache(maxsize=None)
def usable(device_index: int) -> bool:
    """Compute capability >= 9.0 (the bulk prefetch is sm_90's) and Triton importable."""
    if torch.cuda.get_device_capability(device_index) < (9, 0):
        return False
    return importlib.util.find_spec("triton") is not None


def _spans(buffers: list[torch.Tensor]) -> list[tuple[int, int]]:
    """(address, bytes rounded down to 16) of each non-empty buffer, at most MAX_BUFFERS."""
    spans = [(t.data_ptr(), (t.numel() * t.element_size()) // 16 * 16) for t in buffers if t is not None]
    spans = [s for s in spans if s[1] > 0]
    if len(spans) > MAX_BUFFERS:
        raise ValueError(f"at most {MAX_BUFFERS} buffers per prefetch, got {len(spans)}")
    return spans


def prefetch(buffers: list[torch.Tensor]) -> None:
    """Ask L2 to fetch ``buffers`` (CUDA tensors on the current device), one launch on the current stream; returns
    without waiting for the bytes (nor does the kernel). Capturable in a CUDA graph (addresses are fixed)."""
    spans = _spans(buffers)
    if not spans:
        return
    per = CHUNK * LANES
    progs = [-(-n // per) for _, n in spans]
    while len(spans) < MAX_BUFFERS:
        spans.append((spans[0][0], 0))
        progs.append(0)
    p1, p2 = progs[0], progs[0] + progs[1]
    (a0, n0), (a1, n1), (a2, n2) = spans
    _kernel()[(p2 + progs[2],)](a0, n0, a1, n1, a2, n2, p1, p2, CHUNK_B=CHUNK, LANES_N=LANES, num_warps=1)


def weight_buffers(linear: torch.nn.Module, rows: int) -> list[torch.Tensor]:
    """The buffers an :class:`model_server.int4.Int4Linear` reads in a step of ``rows`` rows (its kernel's layout)."""
    from model_server.int4_choice import step_kernel

    kernel = step_kernel(linear.kernel, linear.rows_kernel, rows, linear.out_features,
                         getattr(linear, "int4pack_rows", 0))
    if kernel == "mma":
        return [linear.mma_words, linear.mma_scales]
    if kernel == "triton" and getattr(linear, "triton_paired", None) is not None:   # the GEMM reads these there
        return [linear.triton_packed, linear.triton_paired]
    if kernel in ("triton", "gemv"):
        return [linear.triton_packed, linear.triton_scales, linear.triton_zeros]
    return [linear.weight_packed, linear.scales_and_zeros]


def link(chain: list[torch.nn.Module], how: str | None) -> int:
    """Each linear of ``chain`` (a step's order) prefetches the next one's weights (``Int4Linear.l2_next``, ``how``
    ``inline`` or ``side``); ``how`` None unlinks them all. Returns how many linears prefetch."""
    for a, b in zip(chain, chain[1:]):
        if how is None:
            a.__dict__.pop("l2_next", None)
        else:
            a.l2_next = (b, how)
    if chain:
        chain[-1].__dict__.pop("l2_next", None)
    return 0 if how is None else max(len(chain) - 1, 0)


@lru_cache(maxsize=None)
def _side_stream(device_index: int, stream_id: int) -> torch.cuda.Stream:
    """One side stream per device and step stream (the engine's and the background warm-up's never share one)."""
    return torch.cuda.Stream(device=device_index)


def ahead(nxt: torch.nn.Module, rows: int, how: str) -> torch.cuda.Stream | None:
    """Prefetch what ``nxt`` will read at ``rows`` rows: ``inline`` on the current stream, ``side`` on a side stream
    forked from it (returned: :func:`join` it after the current linear's kernel); None when nothing was forked."""
    if rows > MAX_ROWS or how == "off":
        return None
    bufs = weight_buffers(nxt, rows)
    if not bufs or bufs[0].device.type != "cuda":
        return None
    if how == "inline":
        prefetch(bufs)
        return None
    cur = torch.cuda.current_stream()
    side = _side_stream(cur.device.index, cur.stream_id)
    side.wait_stream(cur)
    with torch.cuda.stream(side):
        prefetch(bufs)
    return side


def join(side: torch.cuda.Stream | None) -> None:
    """The current stream waits for ``side`` (a graph capture needs every fork joined; the prefetch kernel is short)."""
    if side is not None:
        torch.cuda.current_stream().wait_stream(side)
