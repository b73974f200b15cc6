"""INT4 weight-only linears for ``--quantization int4``: group-wise 4-bit weights (quantized by
:mod:`model_server.int4_quant`), the kernels that multiply them, and which kernel a step runs.

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
  rows, the Triton GEMM above (two layouts, as ``mixed``); a layer its layout cannot hold (group below 64, outputs not
  a multiple of 16) takes ``mixed``'s kernels instead.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from model_server.int4_quant import dequantize_groupwise, quantize_groupwise
from model_server.switches import SwitchValueError

GROUP_SIZES = (32, 64, 128, 256)
INNER_K_TILES = 8            # int4pack tiling along K: K must be a multiple of 16 * INNER_K_TILES
TINYGEMM_MAX_ROWS = 8        # with rows_kernel "triton": steps of more rows than this run Triton
WIDE_LAYERS = ((65536, 3), (16384, 5))   # ... except layers of at least this many outputs: (width, bound)
GEMV_MAX_ROWS = 16           # with rows_kernel "gemv": steps of at most this many rows run int4_gemv
MMA_MAX_ROWS = 16            # with int4_kernel "mma": steps of up to this many rows run int4_mma, more the Triton GEMM
KERNEL_MODES = ("auto", "tinygemm", "triton", "mixed", "triton-gemm", "mma")
AUTO_MODE = "mixed"          # what "auto" means on CUDA >= 8.0 with Triton, where the mma kernel does not build
AUTO_MODE_MMA = "mma"        # ... and where it does (module docstring)


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
        return ComputeChoice(torch.bfloat16, "mma", why + f"; CUDA mma kernel up to {MMA_MAX_ROWS} rows, Triton "
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
    if device.type == "cuda" and mode != "tinygemm" and cap is not None and tuple(cap) >= (8, 0):
        from model_server import int4_mma, int4_triton
        triton = int4_triton.available()
        mma = mode in ("mma", "auto") and int4_mma.usable(device)
    return choose_compute(device.type, cap, triton, mode, mma)


def _pack(q: torch.Tensor, kernel: str) -> torch.Tensor:
    if kernel == "cuda-int4pack":
        u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack(u8.contiguous(), INNER_K_TILES)
    if kernel == "cpu-int4pack":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), INNER_K_TILES)
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).contiguous()       # dequant: plain nibbles


def tinygemm_max_rows(out_features: int) -> int:
    """Rows up to which the ``mixed`` mode runs int4pack on a layer with ``out_features`` outputs
    (``WIDE_LAYERS``). From the H200 sweep (2026-12-04, per linear in a CUDA graph, docs/benchmarks.md): int4pack's
    time grows with the rows, and the faster the wider the layer. The 128256 x 2048 LM head took 74.9 us at 1 row
    and 171.8 at 8, the Triton GEMM (dequantizing) 103.8 at 8; the 16384 x 2048 gate/up projection 12.0 and 24.9,
    the GEMM 20.5. Straight lines between 1 and 8 rows cross the GEMM near 3.4 and 5.6 rows. The narrower layers
    (3072 and 2048 outputs) stay faster on int4pack up to 8 rows."""
    for width, rows in WIDE_LAYERS:
        if out_features >= width:
            return rows
    return TINYGEMM_MAX_ROWS


def step_kernel(int4_kernel: str, rows_kernel: str | None, rows: int, out_features: int) -> str:
    """The kernel a step of ``rows`` rows runs on a layer of ``out_features`` outputs: ``"gemv"``, ``"triton"``
    (the GEMM) or ``int4_kernel`` itself (the module docstring's modes; :class:`Int4Linear` and the benchmarks)."""
    if int4_kernel == "triton":
        return "gemv" if rows_kernel == "gemv" and rows <= GEMV_MAX_ROWS else "triton"
    if int4_kernel == "mma":
        return "mma" if rows <= MMA_MAX_ROWS else "triton"
    return "triton" if rows_kernel == "triton" and rows > tinygemm_max_rows(out_features) else int4_kernel


def layer_kernel(int4_kernel: str, n: int, k: int, group_size: int) -> str:
    """The kernel an ``[n, k]`` layer takes under ``int4_kernel``: itself, except ``"mma"`` where the mma layout cannot
    hold the layer (:func:`model_server.int4_mma.holds`): then int4pack, with the Triton GEMM above as in ``mixed``."""
    if int4_kernel == "mma":
        from model_server.int4_mma import holds as mma_holds
        if not mma_holds(n, k, group_size):
            return "cuda-int4pack"
    return int4_kernel


def holds(n: int, k: int, group_size: int, kernel: str | None = None) -> bool:
    """Whether the int4pack layout holds an ``[n, k]`` weight: K a multiple of the group and of 16 * inner tiles,
    N of 8 (of 16 for ``kernel`` ``cpu-int4pack``: the CPU packing's own rule)."""
    return (group_size in GROUP_SIZES and k % group_size == 0 and k % (16 * INNER_K_TILES) == 0
            and n % (16 if kernel == "cpu-int4pack" else 8) == 0)


def fits(linear: nn.Linear, group_size: int, kernel: str | None = None) -> bool:
    """Whether the int4pack layout (:func:`holds`) holds this linear's weight."""
    n, k = linear.weight.shape
    return holds(n, k, group_size, kernel)


class Int4Linear(nn.Module):
    """``y = x @ W'^T + b`` with ``W'`` the group-wise INT4 weight (see the module docstring).

    Built from a float ``nn.Linear`` (quantized here, :func:`quantize_groupwise`) or, with
    :meth:`from_quantized`, from 4-bit values and scales that are already made (a GPTQ or AWQ checkpoint,
    :mod:`model_server.int4_repack`). ``input_perm`` (a GPTQ act-order checkpoint): the layer's groups
    are contiguous in a permuted order of the input columns, so ``x`` is gathered into that order first."""

    def __init__(self, linear: nn.Linear, group_size: int, choice: ComputeChoice, clip_search: bool = False) -> None:
        super().__init__()
        if not fits(linear, group_size, choice.int4_kernel):
            n, k = linear.weight.shape
            raise ValueError(f"cannot quantize a [{n}, {k}] linear with group size {group_size}")
        q, sz = quantize_groupwise(linear.weight, group_size, clip_search)
        self._hold(q.to(linear.weight.device), sz, group_size, choice,
                   None if linear.bias is None else linear.bias.detach(), None)

    @classmethod
    def from_quantized(cls, q: torch.Tensor, sz: torch.Tensor, group_size: int, choice: ComputeChoice,
                       bias: torch.Tensor | None = None, input_perm: torch.Tensor | None = None) -> Int4Linear:
        """``q`` uint8 ``[N, K]`` in 0..15 and ``sz`` ``[K/group_size, N, 2]`` (scale, zero) as
        :func:`quantize_groupwise` returns them, on the device the module should live on."""
        n, k = q.shape
        if not holds(n, k, group_size, choice.int4_kernel):
            raise ValueError(f"the int4pack layout cannot hold a [{n}, {k}] weight with group size {group_size}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._hold(q, sz, group_size, choice, bias, input_perm)
        return self

    def _hold(self, q: torch.Tensor, sz: torch.Tensor, group_size: int, choice: ComputeChoice,
              bias: torch.Tensor | None, input_perm: torch.Tensor | None) -> None:
        n, k = q.shape
        self.in_features, self.out_features = k, n
        self.group_size = group_size
        self.kernel = choice.int4_kernel
        self.rows_kernel = choice.rows_kernel
        self.kernel = layer_kernel(self.kernel, n, k, group_size)
        self.compute_dtype = choice.dtype
        dev = q.device
        sz = sz.to(device=dev, dtype=choice.dtype)
        if self.kernel == "mma":
            from model_server import int4_mma
            words, scales = int4_mma.pack(q, sz, group_size)
            self.register_buffer("mma_words", words)
            self.register_buffer("mma_scales", scales)
            int4_mma.reserve(dev, n, k, MMA_MAX_ROWS)
        elif self.kernel != "triton":
            self.register_buffer("weight_packed", _pack(q, self.kernel))
            self.register_buffer("scales_and_zeros", sz)
        if self.uses_triton:
            from model_server import int4_triton
            self.register_buffer("triton_packed", int4_triton.pack_int4(q, group_size))
            scales, zeros = int4_triton.split_scales_and_zeros(sz)
            self.register_buffer("triton_scales", scales)
            self.register_buffer("triton_zeros", zeros)
        self.register_buffer("input_perm", None if input_perm is None else input_perm.to(dev, torch.int64))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dev, choice.dtype), requires_grad=False)

    @property
    def uses_triton(self) -> bool:
        return self.kernel == "triton" or self.rows_kernel == "triton"       # rows_kernel "gemv" implies "triton"

    def runs_triton(self, rows: int) -> bool:
        """Whether a step of ``rows`` rows runs the Triton GEMM (:func:`step_kernel`)."""
        return step_kernel(self.kernel, self.rows_kernel, rows, self.out_features) == "triton"

    def _unpacked(self) -> torch.Tensor:
        p = self.weight_packed
        q = torch.stack([p >> 4, p & 15], dim=-1).reshape(self.out_features, self.in_features)
        return dequantize_groupwise(q, self.scales_and_zeros, self.group_size).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)
        if self.input_perm is not None:
            x2 = x2.index_select(1, self.input_perm)
        kernel = step_kernel(self.kernel, self.rows_kernel, x2.shape[0], self.out_features)
        if kernel == "mma":
            from model_server.int4_mma import int4_mma_mm
            y = int4_mma_mm(x2, self.mma_words, self.mma_scales, self.group_size)
        elif kernel == "gemv":
            from model_server.int4_gemv import int4_gemv_mm
            y = int4_gemv_mm(x2, self.triton_packed, self.triton_scales, self.triton_zeros, self.group_size)
        elif kernel == "triton":
            from model_server.int4_triton import int4_triton_mm
            y = int4_triton_mm(x2, self.triton_packed, self.triton_scales, self.triton_zeros, self.group_size)
        elif kernel == "cuda-int4pack":
            y = torch.ops.aten._weight_int4pack_mm(x2, self.weight_packed, self.group_size, self.scales_and_zeros)
        elif kernel == "cpu-int4pack":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight_packed, self.group_size,
                                                           self.scales_and_zeros)
        else:
            y = x2 @ self._unpacked().t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        above = MMA_MAX_ROWS if self.kernel == "mma" else tinygemm_max_rows(self.out_features)
        rows = "" if not self.rows_kernel else (f", up to {GEMV_MAX_ROWS} rows={self.rows_kernel}"
                                                if self.rows_kernel == "gemv" else
                                                f", above {above} rows={self.rows_kernel}")
        return f"in={self.in_features}, out={self.out_features}, group={self.group_size}, kernel={self.kernel}{rows}"


def quantize_model(model: nn.Module, group_size: int = 128, choice: ComputeChoice | None = None,
                   lm_head: bool = True, clip_search: bool = False) -> int:
    """Replace the decoder's ``nn.Linear`` layers (and ``lm_head`` unless ``lm_head=False``) in place.

    Layers whose shape the int4pack layout cannot hold (see :func:`fits`) stay as they are; ValueError
    when none fits. Embeddings and norms stay in the compute dtype. A tied ``lm_head`` gets its own INT4 copy (the
    embedding stays, since a lookup reads only a few rows; the head reads all of it every step).
    Returns the number of layers replaced; marks the model ``is_int4_weight_only``.
    """
    if choice is None:
        choice = device_compute(next(model.parameters()).device)
    targets = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (lm_head or not name.endswith("lm_head")) and fits(mod, group_size,
                                                                                               choice.int4_kernel):
            targets.append(name)
    if not targets:
        raise ValueError(f"no linear layer fits group size {group_size} (K a multiple of "
                         f"{max(group_size, 16 * INNER_K_TILES)}, N of 8, of 16 on CPU)")
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int4Linear(getattr(parent, attr), group_size, choice, clip_search))
    if lm_head and "lm_head" in targets:
        model.config.tie_word_embeddings = False
        if hasattr(model, "_tied_weights_keys"):
            model._tied_weights_keys = None
    model.is_int4_weight_only = True
    model.int4_group_size = group_size
    model.int4_kernel = choice.int4_kernel + (f"+{choice.rows_kernel}" if choice.rows_kernel else "")
    return len(targets)
