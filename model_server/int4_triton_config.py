"""Launch configurations of the INT4 Triton GEMM (:mod:`model_server.int4_triton`): :class:`Config`, the choice per
step and layer (:func:`choose_config`), how the kernel dequantizes (:func:`deq_mode`, ``MODEL_SERVER_INT4_TRITON_DEQ``,
and the kernel's ``DEQ`` constant, :func:`deq`), its pipeline stages above 32 rows (:func:`stages_override`),
programmatic dependent launch (:func:`pdl_on`), the GLU epilogue's switch (:func:`glu_on`), scales and zeros as one
word (:func:`paired_scales_on`) and an experiment (:func:`fence_on`). Owns no kernel and no layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from model_server.switches import SwitchValueError, choice, flag, integer


@dataclass(frozen=True)
class Config:
    """One launch of the GEMM: its tile (rows x columns), split K, pipeline stages, warps and how it dequantizes."""
    block_m: int
    block_n: int
    split_k: int
    num_stages: int
    num_warps: int = 4
    swap_ab: bool = True             # tile of y^T: the weight is the dot's left operand (small M on the N side)
    fold: bool = True                # scale/zero after each K-block's dot (else dequantize, then dot)
    fma: bool = False                # dequantize in the activation dtype, one fused multiply-add (else in fp32)
    ptx: bool = False                # with fma: unpack the nibbles with 4 PTX instructions per 2 bytes (GPU only)


DEQ_SWITCH = "MODEL_SERVER_INT4_TRITON_DEQ"
DEQ_MODES = ("auto", "fp32", "fma", "fma-ptx")   # the first is the default


@lru_cache(maxsize=1)
def deq_mode() -> str:
    """``auto``, ``fp32``, ``fma`` or ``fma-ptx`` from ``MODEL_SERVER_INT4_TRITON_DEQ`` (unset: ``auto``), read once per
    process (tests clear the cache); another value raises :class:`model_server.switches.SwitchValueError`. ``fma``
    dequantizes each weight as ``fma(q - 8, scale, zero)`` in the activation dtype (``(c + q) - (c + 8)`` is exact, so
    one rounding): 5.6 instead of 7.7 SASS instructions per weight at 64 rows (bf16x2 HADD2 + HFMA2 instead of FFMA +
    F2FP); ``fma-ptx`` also makes ``c + q`` of two bytes with one PRMT, two LOP3 and a shift (inline PTX; the
    interpreter and fp32 use the plain unpack): 4.4, and 128 instead of 160 registers. ``auto``: ``fma-ptx`` at every
    row count (an H100, docs/benchmarks.md "Dequantizing with one FMA": linears of a 64-row step 1,084 -> 880 us;
    "INT4 at 64 streams, second pass": 8-18 % faster than ``fp32`` at 256-2,048 rows, 12,977 -> 11,196 us at
    2,048)."""
    return choice(DEQ_SWITCH, DEQ_MODES)


PDL_SWITCH = "MODEL_SERVER_INT4_TRITON_PDL"
STAGES_SWITCH = "MODEL_SERVER_INT4_TRITON_STAGES"
WIDE_N = 65536                       # 33-64 rows: layers at least this wide (the LM head) pipeline 2 stages, others 4


@lru_cache(maxsize=1)
def stages_override() -> int | None:
    """``MODEL_SERVER_INT4_TRITON_STAGES``: pipeline stages for every launch of steps of more than 32 rows (an A/B
    switch; unset: :func:`choose_config`'s). 2-6; another value raises
    :class:`model_server.switches.SwitchValueError`."""
    value = integer(STAGES_SWITCH)
    if value is not None and not 2 <= value <= 6:
        raise SwitchValueError(f"{STAGES_SWITCH} must be 2-6, got {value}")
    return value


@lru_cache(maxsize=1)
def pdl_on() -> bool:
    """Launch the GEMM and its split-K sum with programmatic dependent launch (compute capability >= 9.0; the caller
    checks): each waits for the previous kernel's writes at its start (``griddepcontrol.wait``) instead of being
    launched after it ends, and the GEMM lets the next kernel launch once its main loop is done. On by default
    (unset or ``1``); ``MODEL_SERVER_INT4_TRITON_PDL=0`` turns it off. On an H100 (docs/benchmarks.md, "INT4 at 64
    streams, third pass"), with the pipeline stages :func:`choose_config` serves, every served configuration at 33, 48
    and 64 rows gave the same bits with and without it (18/18) and from run to run, the linears of a 64-row step took
    855 instead of 915 us, and INT4's tokens/s at 64 streams rose 1.9 % (43,341 vs 42,522, consecutive processes). It
    was off before because with 3 stages the 64-row LM head's bits changed with it (the 3-stage race, which changes
    bits with PDL off too and is avoided by :func:`choose_config`). Read once per process; another value raises
    :class:`model_server.switches.SwitchValueError`."""
    return flag(PDL_SWITCH) is not False


FENCE_SWITCH = "MODEL_SERVER_INT4_TRITON_FENCE"


@lru_cache(maxsize=1)
def fence_on() -> bool:
    """``MODEL_SERVER_INT4_TRITON_FENCE=1`` (compute capability >= 9.0; the caller checks): a
    ``fence.proxy.async.shared::cta`` in each K-block after the copies into shared memory are waited for and before
    the wgmma that reads them (the compiled PTX puts it there; tests/test_int4_compile_check.py). Triton emits none
    there; CUTLASS's cp.async mainloops for sm_90 do. An experiment for the 3-stage race (docs/benchmarks.md, "INT4
    at 64 streams, second pass"); it does not remove it (an H100, "INT4 at 64 streams, third pass": with 3 stages at
    64 rows 7 of 9 cases repeated their bits with it, 8 of 9 without), so it stays off (unset or ``0``) and kept for
    A/B runs only. Read once per process."""
    return flag(FENCE_SWITCH) is True


PAIRED_SWITCH = "MODEL_SERVER_INT4_TRITON_PAIRED_SCALES"


@lru_cache(maxsize=1)
def paired_scales_on() -> bool:
    """``MODEL_SERVER_INT4_TRITON_PAIRED_SCALES=1``: an INT4 layer that runs the Triton GEMM also holds its scales and
    zeros as one 32-bit word per group and column (:func:`model_server.int4_triton_layout.pair_scales_and_zeros`,
    16-bit compute dtypes) instead of split scales and zeros (kept too only where the small-rows GEMV runs, which reads
    them split), and the GEMM, its GLU epilogue and the prefill pass (:mod:`model_server.int4_dequant`) read those. Compiled for sm_90 with separate 16-bit scales and zeros, each K-block of the main loop waits
    for four plain global loads (Triton's software pipeline moves only loads of at least 32 bits per thread through
    shared memory); a 32-bit word per column is carried by the pipeline's asynchronous copies like the weights
    (tests/test_int4_compile_check.py checks both). Off (unset or ``0``) until measured on a GPU; the bits are the same
    either way. Read once per process; another value raises :class:`model_server.switches.SwitchValueError`."""
    return flag(PAIRED_SWITCH) is True


GLU_SWITCH = "MODEL_SERVER_INT4_GLU_EPILOGUE"


@lru_cache(maxsize=1)
def glu_on() -> bool:
    """A merged INT4 gate/up projection that runs the Triton GEMM without split K stores ``silu(gate) * up`` from the
    GEMM's epilogue (:mod:`model_server.int4_triton_glu`) instead of both products for a separate SiLU-mul kernel. On
    by default (unset or ``1``); ``MODEL_SERVER_INT4_GLU_EPILOGUE=0`` turns it off (measured with the split sums in
    their consumers: docs/benchmarks.md, "INT4 at 64 streams, fourth pass"). Read once per process; another value
    raises :class:`model_server.switches.SwitchValueError`."""
    return flag(GLU_SWITCH) is not False


def choose_config(m: int, n: int, k: int, bk: int, num_sms: int) -> Config:
    """From sweeps on an H200 (benchmarks/int4_kernels.py, 2026-12-03 and -04): BLOCK_N 64; split K (a power of
    two dividing the K-blocks, >= 2 K-blocks per split) while the tiles do not fill the SMs; M <= 64: swap-AB,
    BLOCK_M 16/32/64; M > 64: normal order, BLOCK_M 128, 4 warps (at 256 rows split K took the 2048 x 8192
    projection from 81 to 35 us and 2048 x 2048 from 22 to 14 us). Dequantize, never fold: in the 2026-12-04
    sweep (int4_gemv_sweep) the same config dequantizing was 5-12 % faster than folding at 1, 8 and 16 rows on
    four of the 1B model's five shapes (gate/up 23.1-23.2 -> 20.4-20.5 us, the LM head 108-111 -> 103-104 us)
    and equal within 0.03 us on the fifth (2048 x 2048); folding stays a Config option for sweeps.
    Pipeline stages: 4 up to 32 rows; 33-64 rows 4 (2 on layers of at least ``WIDE_N`` outputs), never 3: on an H100
    (2026-12-06, docs/benchmarks.md "INT4 at 64 streams, second pass") 3 stages gave different bits from
    run to run on grids of more programs than the SMs hold (the 64-row LM head; split-K variants), 2 and 4 did not,
    and 4 cost 0.1-0.3 us per layer, 2 on the LM head 20.7 us (4: 36.7); above 64 rows 3 (deterministic there in the
    same check, and 4 was 1.5x slower)."""
    bn = 64
    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    tiles = -(-m // bm) * -(-n // bn)
    iters = k // bk
    split = 1
    while tiles * split < num_sms and iters % (2 * split) == 0 and iters // (2 * split) >= 2:
        split *= 2
    how = deq_mode()
    if how == "auto":
        how = "fma-ptx"
    fma, ptx = how != "fp32", how == "fma-ptx"
    stages = 4 if bm <= 32 else stages_override() or (3 if m > 64 else 2 if n >= WIDE_N else 4)
    if m > 64:
        return Config(bm, bn, split, stages, 4, False, False, fma, ptx)
    return Config(bm, bn, split, stages, 4, True, False, fma, ptx)


def deq(cfg: Config, magic: int, interpret: bool) -> int:
    """The kernel's DEQ: 0 fp32 (or folding), 1 one FMA in the activation dtype, 2 the same with the PTX unpack
    (bf16 / fp16 on a GPU; Triton's interpreter runs no inline PTX)."""
    if cfg.fold or not cfg.fma:
        return 0
    return 2 if cfg.ptx and magic and not interpret else 1
