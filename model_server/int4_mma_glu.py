"""The GLU epilogue of the CUDA mma kernel (:mod:`model_server.int4_mma`): a merged INT4 gate/up projection that the
mma kernel runs (steps of up to ``int4.mma_max_rows`` rows: 1-32 on the 1B preset's 16,384-output gate/up) stores
``silu(gate) * up`` instead of both products, so the MLP's separate SiLU-mul kernel (one launch per layer and step)
and the write and read of the ``[M, 2 I]`` product go away. The Triton GEMM has had the same epilogue for more rows
since 2026-12-06 (:mod:`model_server.int4_triton_glu`); this is its counterpart for decode steps of few rows, where a
step is bound by kernel count and latency.

How (``model_server/data/int4_mma.cu``, template argument ``GLU``): each warp's ``r`` 16-row weight tiles are ``r / 2``
gate tiles and the up tiles ``I`` rows below them, so a lane's accumulators hold gate and up of the same outputs and
tokens; the same weight layout as the plain kernel (no copy). Rounding as the separate ops round: each product to
bf16, ``silu`` in fp32 to bf16, then the product. With split K the column's last CTA applies it to the summed partials.

On by default since 2026-12-07 22:10 (``MODEL_SERVER_INT4_MMA_GLU=0`` turns it off): on an H100 (2026-12-07,
``benchmarks/gpu_calls.sh mmaglu``) it gave the same bits as the kernel plus the separate ops at 1-32 rows, and served
it gave INT4 +2.2 % tokens/s at 1 stream and +2.6 / +2.8 % at 8 against the switch off, in two A/Bs in either order
(docs/benchmarks.md, "The mma kernel's GLU epilogue served").

Owns: the switch (``MODEL_SERVER_INT4_MMA_GLU``, on unless ``0``), the configuration derived from the plain kernel's
measured one (:func:`glu_config`: the same tiles per CTA and grid, the same split), the first-use check on a device
(:func:`check`, run where the engine starts: the background warm-up or ``ModelRunner.prepare``; until it passes,
:func:`ready` is False and the MLP runs the GEMM and the activation apart), and the wrapper :func:`int4_mma_glu`.
Must NOT pick which kernel a layer runs (``int4``).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterable
from functools import lru_cache

import torch

from model_server import int4_mma
from model_server.switches import flag

log = logging.getLogger(__name__)

SWITCH = "MODEL_SERVER_INT4_MMA_GLU"
_CHECKED: dict[int, str | None] = {}         # device index -> None (passed) or why not
_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def on() -> bool:
    """The epilogue is on unless ``MODEL_SERVER_INT4_MMA_GLU=0`` (unset, empty or ``1``: on); read once per process;
    another value raises :class:`model_server.switches.SwitchValueError`."""
    return flag(SWITCH) is not False


def glu_config(m: int, n: int, k: int, num_sms: int) -> int4_mma.Config | None:
    """The GLU configuration for ``m`` rows of a merged ``[2 I, k]`` gate/up (``n = 2 I``, ``I`` a multiple of 16):
    :func:`int4_mma.choose_config`'s for the layer with each CTA covering as many tiles (an even ``r`` kept; an odd one
    doubled with half the warps where the warps allow, else doubled) and the same split; None where that cannot run."""
    if n % 32:
        return None
    base = int4_mma.choose_config(m, n, k, num_sms)
    if base.r % 2 == 0:
        cfg = dataclasses.replace(base, glu=1)
    elif base.warps % 2 == 0 and (base.warps // 2) % base.kw == 0:
        cfg = dataclasses.replace(base, r=2 * base.r, warps=base.warps // 2, glu=1)
    else:
        cfg = dataclasses.replace(base, r=2 * base.r, glu=1)
    return cfg if int4_mma.fits(cfg, m, k) else None


def int4_mma_glu(x2d: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, group_size: int,
                 config: int4_mma.Config | None = None) -> torch.Tensor | None:
    """``silu(y[:, :I]) * y[:, I:]`` (``[M, I]`` bf16) for ``y = int4_mma_mm(x2d, words, scales)`` of a merged
    ``[gate; up]`` weight, in one launch; None where no GLU configuration serves this step (the caller runs the GEMM
    and the activation apart)."""
    m, k = x2d.shape
    n = int4_mma.checked(x2d, words, scales, group_size)
    if not 1 <= m <= int4_mma.MAX_ROWS:
        return None
    cfg = config or glu_config(m, n, k, int4_mma._num_sms(x2d.device))
    if cfg is None or not cfg.glu or n % 32:
        return None
    y = torch.empty((m, n // 2), device=x2d.device, dtype=torch.bfloat16)
    int4_mma.launch(x2d, words, scales, group_size, cfg, y)
    return y


def ready(device: torch.device) -> bool:
    """Whether the epilogue has passed :func:`check` on ``device`` (False before the check ran; never blocks)."""
    idx = int4_mma.device_index(device)
    return idx in _CHECKED and _CHECKED[idx] is None


def serves(device: torch.device | str) -> bool:
    """Whether a CUDA ``device``'s merged gate/up runs the epilogue now: the switch on and :func:`check` passed there
    (what the benchmarks record beside their numbers)."""
    dev = torch.device(device)
    return dev.type == "cuda" and on() and ready(dev)


def check(device: torch.device | str) -> str | None:
    """Once per device: the epilogue on a small merged gate/up (``I`` = 64, K = 256, group 128) at 1, 5 and 16 rows,
    without and with split K, against the plain kernel's product followed by the separate ops; None if every result
    is within two bf16 units in the last place of the largest output, else why not in one line (logged once as a
    warning: the MLP then runs the GEMM and the activation apart). Does GPU work and synchronizes: call it outside
    graph capture (the background warm-up does)."""
    dev = torch.device(device)
    idx = int4_mma.device_index(dev)
    with _LOCK:
        if idx not in _CHECKED:
            _CHECKED[idx] = _trial(dev)
            if _CHECKED[idx] is not None:
                log.warning("int4 mma GLU epilogue off, the MLP runs the GEMM and SiLU-mul apart: %s", _CHECKED[idx])
        return _CHECKED[idx]


def check_where_served(modules: Iterable[torch.nn.Module]) -> None:
    """With the switch on (the default), :func:`check` on each device that holds one of ``modules``' mma-kernel INT4
    linears (the merged gate/up projections): what an engine runs before it serves or captures a graph, whichever way
    it starts (the background warm-up, or ``ModelRunner.prepare``). Without it :func:`ready` stays False and the
    epilogue never serves: the in-process benchmarks of 2026-12-07 19:18 start without the background warm-up and
    never ran it."""
    if not on():
        return
    from model_server.int4_precompile import mma_layers
    for dev in {layer.mma_words.device for layer in mma_layers(modules)}:
        check(dev)


def random_layer(n: int, k: int, group: int, gen: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ``[n, k]`` 4-bit layer in the mma layout on ``device`` (``(words, scales)``: uniform nibbles, scales
    0.005-0.025, zeros within +-0.01): the check's trial and the GPU benchmark's weights."""
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    sz = torch.stack([torch.rand(k // group, n, generator=gen) * 0.02 + 0.005,
                      (torch.rand(k // group, n, generator=gen) - 0.5) * 0.02], dim=-1).to(torch.bfloat16)
    words, scales = int4_mma.pack(q, sz, group)
    return words.to(device), scales.to(device)


def _trial(dev: torch.device) -> str | None:
    try:
        gen = torch.Generator().manual_seed(0)
        n, k, group = 128, 256, 128
        words, scales = random_layer(n, k, group, gen, dev)
        for m in (1, 5, 16):
            x = torch.randn(m, k, generator=gen).to(dev, torch.bfloat16)
            y = int4_mma.int4_mma_mm(x, words, scales, group)
            gate, up = y[:, : n // 2], y[:, n // 2:]
            ref = (torch.nn.functional.silu(gate.float()).to(torch.bfloat16).float() * up.float()).to(torch.bfloat16)
            for split in (1, 2):
                cfg = int4_mma.Config(int4_mma.token_tiles(m), 2, 2, 2, split, 1, 1, 1)
                got = int4_mma_glu(x, words, scales, group, cfg)
                tol = 2 * 2.0 ** -8 * max(float(ref.float().abs().max()), 1e-3)
                off = float((got.float() - ref.float()).abs().max()) if got is not None else float("inf")
                if got is None or got.shape != ref.shape or off > tol:
                    return f"differs from the GEMM and SiLU-mul at {m} rows, split {split} (off by up to {off:.3g})"
    except Exception as exc:  # noqa: BLE001 - reported; the unfused path serves
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return None
