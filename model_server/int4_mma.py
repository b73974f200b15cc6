"""A CUDA W4A16 kernel for decode-sized INT4 steps (1-64 rows), compiled at run time with NVRTC.

The Triton kernels (:mod:`model_server.int4_triton`, :mod:`model_server.int4_gemv`) lose to bf16 cuBLAS from 8 rows
up on the 1B preset's small matrices (docs/benchmarks.md, "INT4 above 8 rows": 0.84-1.02x per step's linears at 8
and 64 rows on an H200), bound by each program's chain of dependent K-blocks. This kernel
(``model_server/data/int4_mma.cu``; its header comment is the reference for the math and the layout) takes the
other road: every warp streams its own 16-row weight tiles with one 16-byte load per 64 columns, dequantizes in
registers (two bf16x2 FMAs per pair of weights), multiplies on tensor cores with ``mma.sync`` (weights as the
16-row operand, tokens as the 8-column one), keeps several 64-column blocks in flight (activations, weights and
scales in one shared-memory ring fed by ``cp.async``), and splits K across CTAs where a layer's rows do not fill the
card (the last CTA of a column adds the partial sums: no second kernel).

Owns: the layout (:func:`pack`), launch configurations (:class:`Config`, :func:`choose_config` over the
measured table of :mod:`model_server.int4_mma_tuned` and :func:`rule_config`), whether the kernel
builds here (:func:`usable`), the split-K scratch buffers (:func:`reserve`) and the wrapper :func:`int4_mma_mm`.
Compiling and caching it is :mod:`model_server.int4_mma_build`'s. Must NOT quantize (``int4_quant``) or pick which
kernel a layer runs (``int4``).

Split-K scratch: one pair (fp32 partial sums, zeroed tickets) per device and stream, so work on two streams
(the engine's and the background warm-up's) never shares one; kernels captured into a CUDA graph use the
device's graph pair, which must be big enough before capture (:func:`reserve`, called when a layer is built),
since nothing can be allocated or zeroed while capturing. Like cuBLAS's workspace, these buffers are a cache of
scratch memory, not state a result depends on.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from model_server import int4_mma_tuned
from model_server.int4_mma_build import allow_smem, available, device_index, kernel

log = logging.getLogger(__name__)

MAX_ROWS = 64                    # steps of more rows run another kernel (int4.py decides)
BLOCK_K = 64                     # columns per weight load; the group must be a multiple
XROW = 72                        # bf16 per activation row in shared memory (the .cu's XROW)
MAX_SMEM = 99 * 1024             # dynamic shared memory a config may ask for (sm_86's opt-in limit; H100: 227 KB)
_NIBBLE = ((0, 4, 2, 6), (1, 5, 3, 7))   # [row half h][column p within 4] -> nibble of the 32-bit word


def holds(n: int, k: int, group_size: int) -> bool:
    """Whether the layout holds an ``[n, k]`` weight: N a multiple of 16, K of 64 and of the group, group >= 64."""
    return n % 16 == 0 and k % BLOCK_K == 0 and group_size % BLOCK_K == 0 and k % group_size == 0 \
        and group_size & (group_size - 1) == 0


@lru_cache(maxsize=None)
def why_not(device: torch.device | str | None = None) -> str | None:
    """None where the kernel can serve on ``device`` (:func:`available`, and its smallest configuration compiles and
    loads, once per device), else why not, in one line (also logged when the build fails; ``int4.py`` then keeps the
    ``mixed`` kernels and says why in ``/info`` ``int4_kernel_reason``)."""
    if not available(device):
        return "needs CUDA with compute capability >= 8.0 and torch's NVRTC and module loaders"
    dev = torch.device(device if device is not None else "cuda")
    try:
        kernel(Config(1, 1, 4, 4, 1).name(), device_index(dev))
    except Exception as exc:  # noqa: BLE001 - NVRTC missing or failing: another kernel serves
        why = f"does not build ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        log.warning("int4 mma kernel %s; INT4 runs the mixed kernels", why)
        return why
    return None


def usable(device: torch.device | str | None = None) -> bool:
    """Whether the kernel can serve on ``device`` (:func:`why_not` is None)."""
    return why_not(device) is None


def pack(q: torch.Tensor, sz: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` uint8 ``[N, K]`` in 0..15 and ``sz`` ``[K/G, N, 2]`` (scale, zero; bf16) -> ``(words int32 [N/16, K/64,
    32, 4], scales int32 [N/16, K/G, 8, 2])`` in the kernel's layout (the .cu's header)."""
    n, k = q.shape
    if not holds(n, k, group_size):
        raise ValueError(f"the int4 mma layout cannot hold a [{n}, {k}] weight with group size {group_size}")
    if sz.shape != (k // group_size, n, 2):
        raise ValueError(f"scales_and_zeros {tuple(sz.shape)} do not match [{k // group_size}, {n}, 2]")
    t, kb = n // 16, k // BLOCK_K
    qq = q.to(torch.int64).reshape(t, 2, 8, kb, 4, 4, 4)            # [tile, h, g, block, c, j, p]
    shifts = torch.tensor(_NIBBLE, dtype=torch.int64, device=q.device).mul_(4).view(1, 2, 1, 1, 1, 1, 4)
    words = (qq << shifts).sum(dim=(1, 6))                            # [tile, g, block, c, j]
    words = words.permute(0, 2, 1, 3, 4).reshape(t, kb, 32, 4)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32).contiguous()
    bits = sz.to(torch.bfloat16).contiguous().view(torch.int16).to(torch.int32) & 0xFFFF   # [KG, N, 2]
    bits = bits.reshape(k // group_size, t, 2, 8, 2)                  # [group, tile, h, g, scale/zero]
    pairs = bits[:, :, 0].to(torch.int64) | (bits[:, :, 1].to(torch.int64) << 16)     # [group, tile, g, 2]
    pairs = torch.where(pairs >= 1 << 31, pairs - (1 << 32), pairs).to(torch.int32)
    return words, pairs.permute(1, 0, 2, 3).contiguous()


def unpack(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack`'s weight half: int32 ``[N/16, K/64, 32, 4]`` -> uint8 ``[N, K]`` (tests)."""
    t, kb = words.shape[:2]
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = w.reshape(t, kb, 8, 4, 4).permute(0, 2, 1, 3, 4)             # [tile, g, block, c, j]
    shifts = torch.tensor(_NIBBLE, dtype=torch.int64, device=words.device).mul_(4)   # [h, p]
    q = (w[:, None, :, :, :, :, None] >> shifts.view(1, 2, 1, 1, 1, 1, 4)) & 15   # [tile, h, g, block, c, j, p]
    return q.reshape(t * 16, kb * BLOCK_K).to(torch.uint8)


@dataclass(frozen=True)
class Config:
    nt: int                      # 8-token tiles: rows <= 8 * nt
    r: int                       # 16-row weight tiles per warp (per row group when kw > 1)
    warps: int                   # per CTA, all of them: (warps / kw) row groups x kw along K
    stages: int
    split: int                   # CTAs along K (gridDim.y)
    flat: int = 0                # 1: the .cu's FLAT variant (activation copies unrolled)
    kw: int = 1                  # warps along K inside a CTA (the .cu's KW: 1, 2 or 4)
    glu: int = 0                 # 1: the GLU epilogue (:mod:`model_server.int4_mma_glu`; r gate and up tiles)

    def name(self) -> str:
        if self.glu:
            return f"w4a16_mma<{self.nt},{self.r},{self.warps},{self.stages},{self.flat},{self.kw},{self.glu}>"
        extra = "" if not self.flat and self.kw == 1 else f",{self.flat}" + ("" if self.kw == 1 else f",{self.kw}")
        return f"w4a16_mma<{self.nt},{self.r},{self.warps},{self.stages}{extra}>"

    def row_groups(self) -> int:
        return self.warps // self.kw

    def smem_bytes(self) -> int:
        """Dynamic shared memory (the .cu): per stage the activations, the row groups' weight tiles and their scales;
        with kw > 1 at least the hand-over of the sums at the end ([kw - 1][groups][r][nt][32] float4)."""
        ring = self.stages * (self.nt * 8 * XROW * 2 + self.row_groups() * self.r * (512 + 64))
        return max(ring, (self.kw - 1) * self.row_groups() * self.r * self.nt * 32 * 16)

    def grid_x(self, n: int) -> int:
        """CTAs along the outputs (GLU: ``n`` is the merged ``2 I``; each CTA covers gate tiles and their up tiles)."""
        half = 2 if self.glu else 1
        return -(-(n // 16 // half) // (self.r // half * self.row_groups()))


def token_tiles(m: int) -> int:
    """8-token tiles for ``m`` rows (1, 2, 4 or 8)."""
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"the int4 mma kernel takes 1..{MAX_ROWS} rows, not {m}")
    return 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8


WIDE = 16384                     # layers with at least this many outputs fill the card without splitting K


def rule_config(m: int, n: int, k: int, num_sms: int, flat: int = 0) -> Config:
    """The configuration from a rule, for shapes :mod:`model_server.int4_mma_tuned`'s table lacks. From the H100 sweep
    (benchmarks/int4_mma_bench.py, 2026-12-05 18:58 UTC, docs/benchmarks.md): one 16-row tile per warp, 4 stages;
    layers of at least ``WIDE`` outputs 8 warps and no split (gate/up at 8 rows 13.6 us, the LM head 61.9-64.9 us);
    narrower ones 4 warps and K split in a power of two (>= 4 blocks per split) until the CTAs cover two per SM (q/k/v,
    o: 8 splits; down: 16). ``flat=0`` is the kernel as served until 2026-12-05 22:30 UTC; ``choose_config`` takes
    ``flat=1``, never slower in that sweep's 20 cells by more than its noise (0.1 us) and up to 13 % faster."""
    nt = token_tiles(m)
    if n >= WIDE:
        return Config(nt, 1, 8, 4, 1, flat)
    cfg = Config(nt, 1, 4, 4, 1)
    blocks = k // BLOCK_K
    gx = cfg.grid_x(n)
    split = 1
    while gx * split < 2 * num_sms and blocks % (2 * split) == 0 and blocks // (2 * split) >= 4:
        split *= 2
    return Config(nt, 1, 4, 4, split, flat)


def fits(cfg: Config, m: int, k: int) -> bool:
    """Whether ``cfg`` can run ``m`` rows of a layer with ``k`` inputs (tiles, split, warps, shared memory)."""
    blocks = k // BLOCK_K
    return (cfg.nt * 8 >= m and cfg.split >= 1 and blocks % cfg.split == 0 and blocks // cfg.split >= 2
            and cfg.kw in (1, 2, 4) and cfg.warps % cfg.kw == 0 and 1 <= cfg.warps <= 16 and cfg.flat in (0, 1)
            and (cfg.kw == 1 or cfg.flat == 1) and cfg.r >= 1 and cfg.stages >= 2 and cfg.smem_bytes() <= MAX_SMEM
            and cfg.glu in (0, 1) and (cfg.glu == 0 or cfg.r % 2 == 0))


def choose_config(m: int, n: int, k: int, num_sms: int) -> Config:
    """The launch configuration for ``m`` rows of an ``[n, k]`` layer on a card of ``num_sms`` SMs: the measured one
    (:func:`model_server.int4_mma_tuned.lookup`, a sweep's fastest) where the table has the shape, else
    :func:`rule_config` with FLAT. ``MODEL_SERVER_INT4_MMA_CONFIGS=rule``: the rule as served before the table."""
    nt = token_tiles(m)
    if int4_mma_tuned.mode() == "rule":
        return rule_config(m, n, k, num_sms)
    fields = int4_mma_tuned.lookup(m, n, k, nt, num_sms)
    if fields is not None:
        cfg = Config(*fields)
        if cfg.nt == nt and fits(cfg, m, k):
            return cfg
    return rule_config(m, n, k, num_sms, flat=1)


class _Scratch:
    """Split-K partial sums (fp32) and zeroed tickets for one device and stream (or the device's graphs)."""

    def __init__(self, device: torch.device, part: int, tickets: int) -> None:
        self.part = torch.empty(max(part, 1), device=device, dtype=torch.float32)
        self.tickets = torch.zeros(max(tickets, 1), device=device, dtype=torch.int32)
        self.retired: list[_Scratch] = []           # graphs captured earlier may still point at older buffers

    def fits(self, part: int, tickets: int) -> bool:
        return self.part.numel() >= part and self.tickets.numel() >= tickets


_SCRATCH: dict[tuple[int, Any], _Scratch] = {}
_SCRATCH_LOCK = threading.Lock()


def _needs(cfg: Config, m: int, n: int) -> tuple[int, int]:
    return (cfg.split * m * n if cfg.split > 1 else 0), (cfg.grid_x(n) if cfg.split > 1 else 0)


def _scratch(device: torch.device, key: Any, part: int, tickets: int, grow: bool) -> _Scratch:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    cur = _SCRATCH.get((idx, key))
    if cur is not None and cur.fits(part, tickets):
        return cur
    if not grow:
        raise RuntimeError(f"int4 mma: the graph scratch holds less than this step needs ({part} partial sums, "
                           f"{tickets} tickets); int4_mma.reserve() the layer before capturing")
    with _SCRATCH_LOCK:                                # the pre-warm thread builds layers while the main thread does
        cur = _SCRATCH.get((idx, key))
        if cur is not None and cur.fits(part, tickets):
            return cur
        new = _Scratch(device, max(part, 0 if cur is None else cur.part.numel()),
                       max(tickets, 0 if cur is None else cur.tickets.numel()))
        if cur is not None:
            new.retired = cur.retired + [cur]
        _SCRATCH[(idx, key)] = new
        return new


def reserve(device: torch.device | str, n: int, k: int, max_rows: int = MAX_ROWS) -> None:
    """Size the device's graph scratch for an ``[n, k]`` layer at every row count up to ``max_rows`` (call outside
    capture, e.g. when the layer is built)."""
    device = torch.device(device)
    sms = _num_sms(device)
    part = tickets = 0
    for m in range(1, max_rows + 1):
        p, t = _needs(choose_config(m, n, k, sms), m, n)
        part, tickets = max(part, p), max(tickets, t)
    _scratch(device, "graph", part, tickets, grow=True)


def reserve_config(device: torch.device | str, cfg: Config, m: int, n: int) -> None:
    """Size the device's graph scratch for one configuration (benchmark sweeps capture configs of their own)."""
    part, tickets = _needs(cfg, m, n)
    _scratch(torch.device(device), "graph", part, tickets, grow=True)


@lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def int4_mma_mm(x2d: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, group_size: int,
                config: Config | None = None) -> torch.Tensor:
    """``y [M, N] = x2d [M, K] @ dequant(W)[N, K]^T`` in bf16 (fp32 accumulation), ``1 <= M <= MAX_ROWS``;
    ``words``/``scales`` as :func:`pack` makes them; ``config`` overrides :func:`choose_config` (sweeps)."""
    m, k = x2d.shape
    n = checked(x2d, words, scales, group_size)
    if m == 0:
        return x2d.new_empty((0, n))
    cfg = config or choose_config(m, n, k, _num_sms(x2d.device))
    y = torch.empty((m, n), device=x2d.device, dtype=torch.bfloat16)
    launch(x2d, words, scales, group_size, cfg, y)
    return y


def checked(x2d: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, group_size: int) -> int:
    """The layer's outputs ``N``, or ValueError where ``x2d``, ``words`` and ``scales`` do not fit together."""
    k = x2d.shape[1]
    t, kb = words.shape[:2]
    n = t * 16
    if x2d.dtype != torch.bfloat16 or kb * BLOCK_K != k or scales.shape[:2] != (t, k // group_size) \
            or not holds(n, k, group_size):
        raise ValueError(f"x {tuple(x2d.shape)} {x2d.dtype}, words {tuple(words.shape)}, scales "
                         f"{tuple(scales.shape)} do not match group {group_size} (bf16 activations)")
    return n


def launch(x2d: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, group_size: int, cfg: Config,
           y: torch.Tensor) -> None:
    """Run ``cfg`` on ``x2d`` (at least one row) into ``y`` (``[M, N]``, or ``[M, N / 2]`` with the GLU epilogue)."""
    m, k = x2d.shape
    t, kb = words.shape[:2]
    n = t * 16
    x2d = x2d.contiguous()
    if x2d.data_ptr() % 16:                            # the kernel's 16-byte activation loads
        x2d = x2d.clone()
    dev = x2d.device
    if cfg.nt * 8 < m or kb % cfg.split:
        raise ValueError(f"config {cfg} does not fit {m} rows and {kb} blocks")
    idx = device_index(dev)
    fn = kernel(cfg.name(), idx)
    part, tickets = _needs(cfg, m, n)
    if torch.cuda.is_current_stream_capturing():
        sc = _scratch(dev, "graph", part, tickets, grow=False)
    else:
        sc = _scratch(dev, torch.cuda.current_stream(dev).cuda_stream, part, tickets, grow=True)
    smem = cfg.smem_bytes()
    if smem >= 48 * 1024:
        allow_smem(fn, smem)
    gshift = (group_size // BLOCK_K).bit_length() - 1
    args = [x2d, words, scales, y, sc.part, sc.tickets, m, n, k, gshift, kb // cfg.split]
    grid, block = (cfg.grid_x(n), cfg.split, 1), (cfg.warps * 32, 1, 1)
    if idx == torch.cuda.current_device():
        fn(grid=grid, block=block, args=args, shared_mem=smem)
    else:                                              # the launch goes to the current context: make it the tensors'
        with torch.cuda.device(idx):
            fn(grid=grid, block=block, args=args, shared_mem=smem)
