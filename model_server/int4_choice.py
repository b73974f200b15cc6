"""Which INT4 kernel runs: per device (:func:`device_compute`, ``MODEL_SERVER_INT4_KERNELS``), per layer
(:func:`layer_kernel`) and per step (:func:`step_kernel`, by rows). The kernels themselves and their layouts are
:mod:`model_server.int4`'s (int4pack), :mod:`model_server.int4_triton`'s, :mod:`model_server.int4_gemv`'s and
:mod:`model_server.int4_mma`'s.

Kernels, chosen once per process by :func:`choose_compute` (a pure function of the compute capability, testable
without a GPU), each reading its own layout of the same 4-bit values:

* ``cuda-int4pack``: ``aten._weight_int4pack_mm`` (needs compute capability >= 8.0 and bf16
  activations): reads 4-bit weights, no separate dequantization pass.
* ``cpu-int4pack``: ``aten._weight_int4pack_mm_for_cpu`` (CPU).
* ``dequant``: CUDA below compute capability 8.0 (T4, V100), where the int4pack kernel and bf16 do not
  exist: fp16 compute; each forward dequantizes the weight then runs cuBLAS's fp16 GEMM. Correct, but
  it moves more bytes than fp16 weights would; on such cards NF4 (bitsandbytes) is the faster 4-bit path.
* ``triton``: Triton kernels for every row count, from one layout (:mod:`model_server.int4_triton`'s): steps of at
  most ``GEMV_MAX_ROWS`` rows run the small-rows kernel :mod:`model_server.int4_gemv` (``ComputeChoice.rows_kernel``
  ``"gemv"``), more rows the fused W4A16 GEMM :mod:`model_server.int4_triton`.
* ``triton-dequant``: wherever a step would run the Triton GEMM but has at least
  :func:`model_server.int4_dequant.min_rows` rows (320; a prefill pass): a Triton pass writes the layer's weight in
  the activation dtype, then cuBLAS multiplies (:mod:`model_server.int4_dequant`).

``MODEL_SERVER_INT4_KERNELS`` picks (CUDA, compute capability >= 8.0; below that and on CPU it is ignored):

* ``auto`` (default): ``AUTO_MODE_MMA`` where Triton is importable and the mma kernel builds here (NVRTC;
  :func:`model_server.int4_mma.usable`), ``AUTO_MODE`` where only Triton is, else ``tinygemm`` (the H100 steady state
  of 2026-12-05, docs/benchmarks.md: ``mma`` 1.48x / 1.42x / 0.98x bf16 at 1 / 8 / 64 streams, ``mixed`` 1.67x / 1.21x /
  0.98x);
* ``tinygemm``: int4pack for every row count (fewest bytes, 5x slower than bf16 at 64 rows);
* ``triton``: one layout, the small-rows kernel up to ``GEMV_MAX_ROWS`` rows, the Triton GEMM above;
* ``mixed``: int4pack up to :func:`tinygemm_max_rows` rows (8; fewer on wide layers: 5, 3), the Triton GEMM above
  (``rows_kernel`` ``"triton"``), from a second copy of the weights (/info's measured weight bytes count both);
* ``triton-gemm``: the Triton GEMM for every row count (one layout; for comparisons);
* ``mma``: the CUDA kernel of :mod:`model_server.int4_mma` (NVRTC; ``int4_kernel`` ``"mma"``) up to ``MMA_MAX_ROWS``
  rows (16; 32 on layers of >= 16,384 outputs; ``MODEL_SERVER_INT4_MMA_MAX_ROWS`` sets one bound for all:
  :func:`mma_max_rows`), the Triton GEMM above (two layouts, as ``mixed``); a layer its layout cannot hold (group
  below 64, outputs not a multiple of 16) takes ``mixed``'s kernels instead. Narrow layers (at most
  ``MMA_INT4PACK_MAX_SIDE`` outputs and inputs: the 1B preset's q/k/v and o) also hold int4pack and run it for steps of
  up to :func:`mma_int4pack_rows` rows (4; ``MODEL_SERVER_INT4_MMA_INT4PACK_ROWS``, 0 holds no such copy), where it
  is faster than the mma kernel.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from model_server.switches import SwitchValueError, integer

TINYGEMM_MAX_ROWS = 8        # with rows_kernel "triton": steps of more rows than this run Triton
WIDE_LAYERS = ((65536, 3), (16384, 5))   # ... except layers of at least this many outputs: (width, bound)
GEMV_MAX_ROWS = 16           # with rows_kernel "gemv": steps of at most this many rows run int4_gemv
MMA_MAX_ROWS = 16            # with int4_kernel "mma": steps of up to this many rows run int4_mma, more the Triton GEMM
MMA_WIDE_LAYERS = ((16384, 32),)   # ... except layers of at least this many outputs: (width, bound) (mma_max_rows)
MMA_MAX_ROWS_SWITCH = "MODEL_SERVER_INT4_MMA_MAX_ROWS"   # one bound for every layer, 1..64 (mma_rows_switch)
MMA_INT4PACK_ROWS = 4        # with int4_kernel "mma": steps of up to this many rows on a narrow layer run int4pack
MMA_INT4PACK_MAX_SIDE = 4096 # ... a layer of at most this many outputs and inputs (mma_int4pack_rows)
MMA_INT4PACK_SWITCH = "MODEL_SERVER_INT4_MMA_INT4PACK_ROWS"   # 0..8; 0: no int4pack copy
KERNEL_MODES = ("auto", "tinygemm", "triton", "mixed", "triton-gemm", "mma")
AUTO_MODE = "mixed"          # what "auto" means on CUDA >= 8.0 with Triton, where the mma kernel does not build
AUTO_MODE_MMA = "mma"        # ... and where it does (module docstring)


@lru_cache(maxsize=1)
def mma_rows_switch() -> int | None:
    """``MODEL_SERVER_INT4_MMA_MAX_ROWS`` (1..64, the kernel's own bound), None when unset; read once per process, as
    layers reserve their split-K scratch for it; anything else raises :class:`SwitchValueError`."""
    value = integer(MMA_MAX_ROWS_SWITCH)
    if value is not None and not 1 <= value <= 64:
        raise SwitchValueError(f"{MMA_MAX_ROWS_SWITCH} must be 1..64 (the mma kernel's rows), got {value}")
    return value


@lru_cache(maxsize=1)
def mma_int4pack_switch() -> int:
    """``MODEL_SERVER_INT4_MMA_INT4PACK_ROWS`` (0..8), ``MMA_INT4PACK_ROWS`` when unset; read once per process, as
    layers decide at load whether to hold the int4pack copy; anything else raises :class:`SwitchValueError`."""
    value = integer(MMA_INT4PACK_SWITCH)
    if value is None:
        return MMA_INT4PACK_ROWS
    if not 0 <= value <= 8:
        raise SwitchValueError(f"{MMA_INT4PACK_SWITCH} must be 0..8 (int4pack's rows), got {value}")
    return value


def mma_int4pack_rows(out_features: int, in_features: int) -> int:
    """Steps of up to this many rows on an ``[out_features, in_features]`` layer under the mma kernel run int4pack
    (``aten._weight_int4pack_mm``) from a third copy of its 4-bit weights: :func:`mma_int4pack_switch` on layers of at
    most ``MMA_INT4PACK_MAX_SIDE`` outputs and inputs, else 0 (no copy). From the per-linear timings in a CUDA graph
    of 2026-12-05/06 (``int4_mma_bench.py``, docs/benchmarks.md "int4pack for one-row steps"): at 1 row int4pack took
    3.9-4.0 us on the 3,072 x 2,048 q/k/v and 3.6-3.8 on the 2,048 x 2,048 o against the mma kernel's 5.6-6.1 and
    5.1-5.6 (H200, H100); at 8 rows 5.5-6.2 against 5.4-5.9 on the H200 (H100: o 4.8 against 5.7, q/k/v 6.3 both);
    at 16 rows it loses (7.4-10.0 against 5.8-6.9). The 2,048 x 8,192 down projection gains less at 1 row (7.8-8.4
    against 8.3-8.8 with FLAT) and loses at 8 (13.1 against 9.0-9.4), the 16,384-output gate/up ties at 1 row (11.8-11.9
    against 11.5-11.9), the LM head loses (73-74 against 60-65): they hold no copy. In the engine (H100, 2026-12-07): INT4
    +7.5 % tokens/s at 1 stream, the 1-row graph step 0.783 -> 0.709 ms, 89 MB more weights for the 1B preset."""
    if out_features > MMA_INT4PACK_MAX_SIDE or in_features > MMA_INT4PACK_MAX_SIDE:
        return 0
    return mma_int4pack_switch()


def mma_max_rows(out_features: int | None = None) -> int:
    """Steps of up to this many rows run the mma kernel on a layer of ``out_features`` outputs, more the Triton GEMM:
    the switch where set (:func:`mma_rows_switch`, every layer), else ``MMA_WIDE_LAYERS``' bound for wide layers, else
    ``MMA_MAX_ROWS``. From the H100 benchmark of 2026-12-06 01:31 UTC (per linear in a CUDA graph, docs/benchmarks.md
    "The mma kernel at 32 rows"): at 32 rows the mma kernel beats the Triton GEMM on the 16,384-output gate/up (17.4
    against 21.4 us) and the LM head (88.9 against 114.4) and loses on the 2,048-3,072-output layers (q/k/v 9.8
    against 9.3, o 8.6 against 7.4, down 16.2 against 15.1); at 64 rows it loses on all of them."""
    switch = mma_rows_switch()
    if switch is not None:
        return switch
    return MMA_MAX_ROWS if out_features is None else _width_bound(out_features, MMA_WIDE_LAYERS, MMA_MAX_ROWS)


def _width_bound(out_features: int, wide: tuple[tuple[int, int], ...], default: int) -> int:
    """The bound of the first ``(width, bound)`` in ``wide`` the layer is at least as wide as, else ``default``."""
    return next((rows for width, rows in wide if out_features >= width), default)


def mma_bounds() -> str:
    """:func:`mma_max_rows` in words (``/info``'s ``int4_kernel_reason``)."""
    switch = mma_rows_switch()
    if switch is not None:
        return f"{switch} rows"
    return f"{MMA_MAX_ROWS} rows ({', '.join(f'{r} on layers of >= {w} outputs' for w, r in MMA_WIDE_LAYERS)})"


@dataclass(frozen=True)
class ComputeChoice:
    """What the engine computes in on a device: activation dtype and the INT4 kernel it can use."""

    dtype: torch.dtype
    int4_kernel: str             # "cuda-int4pack" | "cpu-int4pack" | "dequant" | "triton" | "mma"
    reason: str
    rows_kernel: str | None = None   # "triton": steps of more than tinygemm_max_rows() rows run the Triton GEMM;
                                     # "gemv" (with int4_kernel "triton"): steps of <= GEMV_MAX_ROWS run int4_gemv


def choose_compute(device_type: str, capability: tuple[int, int] | None, triton: bool = False,
                   mode: str = "auto", mma: bool = False) -> ComputeChoice:
    """CUDA >= 8.0 (Ampere and later): bf16 with the kernels ``mode`` names (module docstring; Triton's need
    ``triton``, importable); fp16 + dequantize below 8.0 (T4 is 7.5); CPU: bf16 + int4pack."""
    if mode not in KERNEL_MODES:
        raise SwitchValueError(f"MODEL_SERVER_INT4_KERNELS must be one of {', '.join(KERNEL_MODES)}, not {mode!r}")
    if device_type == "cpu":
        return ComputeChoice(torch.bfloat16, "cpu-int4pack", "cpu")
    if capability is None or tuple(capability) < (8, 0):
        return ComputeChoice(torch.float16, "dequant",
                             f"compute capability {capability} < 8.0: no bf16, no int4pack kernel")
    why = f"compute capability {capability} >= 8.0"
    if mode == "auto":
        mode = (AUTO_MODE_MMA if mma else AUTO_MODE) if triton else "tinygemm"
    if mode != "tinygemm" and not triton:
        raise SwitchValueError(f"MODEL_SERVER_INT4_KERNELS={mode}, but Triton is not importable")
    if mode == "mma":
        if not mma:
            raise SwitchValueError("MODEL_SERVER_INT4_KERNELS=mma, but the mma kernel does not build here "
                                   "(NVRTC; the log says why)")
        small = mma_int4pack_switch()
        small = (f"; int4pack up to {small} rows on layers of <= {MMA_INT4PACK_MAX_SIDE} outputs and inputs"
                 if small else "")
        return ComputeChoice(torch.bfloat16, "mma", why + f"; CUDA mma kernel up to {mma_bounds()}{small}, Triton "
                             "GEMM above", rows_kernel="triton")
    if mode == "triton":
        return ComputeChoice(torch.bfloat16, "triton", why + f"; Triton: small-rows kernel up to {GEMV_MAX_ROWS} "
                             "rows, GEMM above", rows_kernel="gemv")
    if mode == "triton-gemm":
        return ComputeChoice(torch.bfloat16, "triton", why + "; Triton GEMM for every row count")
    if mode == "mixed":
        return ComputeChoice(torch.bfloat16, "cuda-int4pack",
                             why + f"; Triton above {TINYGEMM_MAX_ROWS} rows", rows_kernel="triton")
    return ComputeChoice(torch.bfloat16, "cuda-int4pack", why + ("" if triton else "; Triton not importable"))


def device_compute(device: torch.device | str) -> ComputeChoice:
    """:func:`choose_compute` for a device, with ``MODEL_SERVER_INT4_KERNELS`` (module docstring)."""
    device = torch.device(device)
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    mode = os.environ.get("MODEL_SERVER_INT4_KERNELS", "auto").strip() or "auto"
    triton = mma = False
    why_not = None
    if device.type == "cuda" and mode != "tinygemm" and cap is not None and tuple(cap) >= (8, 0):
        from model_server import int4_mma, int4_triton
        triton = int4_triton.available()
        why_not = int4_mma.why_not(device) if mode in ("mma", "auto") else None
        mma = mode in ("mma", "auto") and why_not is None
    choice = choose_compute(device.type, cap, triton, mode, mma)
    if why_not and choice.int4_kernel != "mma":
        choice = replace(choice, reason=f"{choice.reason}; mma kernel {why_not}")
    return choice


def tinygemm_max_rows(out_features: int) -> int:
    """Rows up to which the ``mixed`` mode runs int4pack on a layer with ``out_features`` outputs
    (``WIDE_LAYERS``). From the H200 sweep (2026-12-04, per linear in a CUDA graph, docs/benchmarks.md): int4pack's
    time grows with the rows, and the faster the wider the layer. The 128256 x 2048 LM head took 74.9 us at 1 row
    and 171.8 at 8, the Triton GEMM (dequantizing) 103.8 at 8; the 16384 x 2048 gate/up projection 12.0 and 24.9,
    the GEMM 20.5. Straight lines between 1 and 8 rows cross the GEMM near 3.4 and 5.6 rows. The narrower layers
    (3072 and 2048 outputs) stay faster on int4pack up to 8 rows."""
    return _width_bound(out_features, WIDE_LAYERS, TINYGEMM_MAX_ROWS)


def step_kernel(int4_kernel: str, rows_kernel: str | None, rows: int, out_features: int, int4pack_rows: int = 0) -> str:
    """The kernel a step of ``rows`` rows runs on a layer of ``out_features`` outputs: ``"gemv"``, ``"triton"``
    (the GEMM), ``"triton-dequant"`` (a step of prefill size where the Triton layout is held: dequantize, then cuBLAS;
    :func:`model_server.int4_dequant.takes`), ``"cuda-int4pack"`` (an mma layer that holds int4pack for steps of up
    to ``int4pack_rows`` rows, :func:`mma_int4pack_rows`) or ``int4_kernel`` itself (the module docstring's modes;
    :class:`Int4Linear` and the benchmarks)."""
    if int4_kernel == "triton":
        kernel = "gemv" if rows_kernel == "gemv" and rows <= GEMV_MAX_ROWS else "triton"
    elif int4_kernel == "mma":
        kernel = ("cuda-int4pack" if rows <= int4pack_rows else
                  "mma" if rows <= mma_max_rows(out_features) else "triton")
    else:
        kernel = "triton" if rows_kernel == "triton" and rows > tinygemm_max_rows(out_features) else int4_kernel
    if kernel == "triton":
        from model_server.int4_dequant import takes
        if takes(rows):
            return "triton-dequant"
    return kernel


def layer_kernel(int4_kernel: str, n: int, k: int, group_size: int) -> str:
    """The kernel an ``[n, k]`` layer takes under ``int4_kernel``: itself, except ``"mma"`` where the mma layout cannot
    hold the layer (:func:`model_server.int4_mma.holds`): then int4pack, with the Triton GEMM above as in ``mixed``."""
    if int4_kernel == "mma":
        from model_server.int4_mma import holds as mma_holds
        if not mma_holds(n, k, group_size):
            return "cuda-int4pack"
    return int4_kernel
