"""INT4 weight-only linears for ``--quantization int4``: group-wise 4-bit weights (quantized by
:mod:`model_server.int4_quant`) held in the layout of the kernel :mod:`model_server.int4_choice` picks, the module that
multiplies them (:class:`Int4Linear`, which dispatches each step by rows) and :func:`quantize_model`.
"""
from __future__ import annotations

import torch
from torch import nn

from model_server.int4_choice import (AUTO_MODE, AUTO_MODE_MMA, GEMV_MAX_ROWS, KERNEL_MODES, MMA_MAX_ROWS,
                                      TINYGEMM_MAX_ROWS, WIDE_LAYERS, ComputeChoice, choose_compute, device_compute,
                                      layer_kernel, mma_int4pack_rows, mma_max_rows, step_kernel, tinygemm_max_rows)
from model_server.int4_quant import dequantize_groupwise, quantize_groupwise

__all__ = ["AUTO_MODE", "AUTO_MODE_MMA", "GEMV_MAX_ROWS", "GROUP_SIZES", "INNER_K_TILES", "KERNEL_MODES",
           "MMA_MAX_ROWS", "TINYGEMM_MAX_ROWS", "WIDE_LAYERS", "ComputeChoice", "Int4Linear", "choose_compute",
           "device_compute", "fits", "holds", "layer_kernel", "mma_int4pack_rows", "mma_max_rows", "quantize_model",
           "step_kernel", "tinygemm_max_rows"]                       # int4_choice's names stay importable from here

GROUP_SIZES = (32, 64, 128, 256)
INNER_K_TILES = 8            # int4pack tiling along K: K must be a multiple of 16 * INNER_K_TILES


def _pack(q: torch.Tensor, kernel: str) -> torch.Tensor:
    if kernel == "cuda-int4pack":
        u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack(u8.contiguous(), INNER_K_TILES)
    if kernel == "cpu-int4pack":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), INNER_K_TILES)
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).contiguous()       # dequant: plain nibbles


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
        self.kernel = layer_kernel(choice.int4_kernel, n, k, group_size)
        self.rows_kernel = choice.rows_kernel
        self.kernel_reason = choice.reason + ("" if self.kernel == choice.int4_kernel else
                                              f"; this layer: {self.kernel} (the mma layout cannot hold it)")
        self.compute_dtype = choice.dtype
        dev = q.device
        sz = sz.to(device=dev, dtype=choice.dtype)
        self.int4pack_rows = 0           # an mma layer's steps of up to this many rows run int4pack (step_kernel)
        self.int4pack_kernel = self.kernel   # the layout of weight_packed, where held
        if self.kernel == "mma":
            from model_server import int4_mma, int4_mma_glu
            int4_mma_glu.on()                        # a bad MODEL_SERVER_INT4_MMA_GLU fails the load
            words, scales = int4_mma.pack(q, sz, group_size)
            self.register_buffer("mma_words", words)
            self.register_buffer("mma_scales", scales)
            int4_mma.reserve(dev, n, k, mma_max_rows(n))
            # a third copy, int4pack, for steps of few rows on narrow layers (int4_choice.mma_int4pack_rows); on CPU
            # (tests only: the mma kernel is CUDA's) in the CPU kernel's layout
            self.int4pack_kernel = "cuda-int4pack" if dev.type == "cuda" else "cpu-int4pack"
            if holds(n, k, group_size, self.int4pack_kernel):
                self.int4pack_rows = mma_int4pack_rows(n, k)
            if self.int4pack_rows:
                self.register_buffer("weight_packed", _pack(q, self.int4pack_kernel))
                self.register_buffer("scales_and_zeros", sz)
        elif self.kernel != "triton":
            self.register_buffer("weight_packed", _pack(q, self.kernel))
            self.register_buffer("scales_and_zeros", sz)
        if self.uses_triton:
            from model_server import int4_dequant, int4_triton, int4_triton_config, int4_triton_split
            int4_triton_split.mode()                 # a bad MODEL_SERVER_INT4_TRITON_SPLIT_REDUCE fails the load
            int4_triton_config.deq_mode()            # ... and so does a bad MODEL_SERVER_INT4_TRITON_DEQ
            int4_dequant.min_rows()                  # ... and a bad MODEL_SERVER_INT4_PREFILL_DEQUANT_ROWS
            int4_triton_config.pdl_on()              # ... and MODEL_SERVER_INT4_TRITON_PDL, _FENCE, _STAGES
            int4_triton_config.fence_on()
            int4_triton_config.stages_override()
            int4_triton_split.sum_in_consumer()
            int4_triton_config.glu_on()              # ... and MODEL_SERVER_INT4_GLU_EPILOGUE, _PAIRED_SCALES
            self.register_buffer("triton_packed", int4_triton.pack_int4(q, group_size))
            paired = int4_triton_config.paired_scales_on() and sz.element_size() == 2
            if paired:                               # (scale, zero) as one word: the GEMM and the prefill pass
                self.register_buffer("triton_paired", int4_triton.pair_scales_and_zeros(sz))
            if not paired or self.rows_kernel == "gemv":     # the small-rows GEMV reads them split
                scales, zeros = int4_triton.split_scales_and_zeros(sz)
                self.register_buffer("triton_scales", scales)
                self.register_buffer("triton_zeros", zeros)
            if dev.type == "cuda":                   # the split-K ticket counters a graph capture uses, sized now
                int4_triton_split.reserve(dev, int4_triton._num_sms(dev))
        self.register_buffer("input_perm", None if input_perm is None else input_perm.to(dev, torch.int64))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dev, choice.dtype), requires_grad=False)

    @property
    def uses_triton(self) -> bool:
        return self.kernel == "triton" or self.rows_kernel == "triton"       # rows_kernel "gemv" implies "triton"

    def runs_triton(self, rows: int) -> bool:
        """Whether a step of ``rows`` rows runs the Triton GEMM (:func:`step_kernel`)."""
        return self.step_kernel(rows) == "triton"

    def step_kernel(self, rows: int) -> str:
        """The kernel a step of ``rows`` rows runs on this layer (:func:`model_server.int4_choice.step_kernel`)."""
        return step_kernel(self.kernel, self.rows_kernel, rows, self.out_features, self.int4pack_rows)

    def _unpacked(self) -> torch.Tensor:
        p = self.weight_packed
        q = torch.stack([p >> 4, p & 15], dim=-1).reshape(self.out_features, self.in_features)
        return dequantize_groupwise(q, self.scales_and_zeros, self.group_size).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, False)

    def forward_partials(self, x: torch.Tensor) -> torch.Tensor:
        """``forward(x)``; unless ``MODEL_SERVER_INT4_SPLIT_SUM_IN_CONSUMER=0``, where this step runs the Triton GEMM
        with split K and its sum kernel, the fp32 partial sums ``[split, *x.shape[:-1], out_features]`` instead, for the
        caller to add in split order (:func:`model_server.int4_triton_split.sum_in_consumer`; layers without bias)."""
        if self.bias is not None or not self.uses_triton:
            return self._forward(x, False)
        from model_server.int4_triton_split import sum_in_consumer
        return self._forward(x, sum_in_consumer())

    def forward_silu_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """For a merged ``[gate; up]`` projection (``2 I`` outputs): ``silu(gate) * up`` ``[..., I]`` from the
        Triton GEMM's epilogue (:mod:`model_server.int4_triton_glu`) unless ``MODEL_SERVER_INT4_GLU_EPILOGUE=0``, where
        this step runs that GEMM without split K; else None (the caller runs :meth:`forward` and the activation)."""
        from model_server.int4_triton_config import glu_on
        rows = x.numel() // self.in_features
        if self.bias is None and self.kernel == "mma" and self.step_kernel(rows) == "mma":
            return self._mma_silu_mul(x, rows)
        if self.bias is not None or not self.uses_triton or not glu_on() or not self.runs_triton(rows):
            return None
        from model_server.int4_triton_glu import int4_triton_glu, served_config
        cfg = served_config(rows, self.out_features, self.in_features, self.group_size, x.device)
        if cfg is None:
            return None
        x2 = self._rows(x)
        side = self._prefetch(rows)
        y = int4_triton_glu(x2, self.triton_packed, *self._gemm_scales(), self.group_size, cfg)
        self._joined(side)
        return y.reshape(*x.shape[:-1], self.out_features // 2)

    def _mma_silu_mul(self, x: torch.Tensor, rows: int) -> torch.Tensor | None:
        """``forward_silu_mul`` on the mma kernel's GLU epilogue (:mod:`model_server.int4_mma_glu`) where
        the switch is on (the default; ``MODEL_SERVER_INT4_MMA_GLU=0`` off) and its check passed on this device; else
        None."""
        from model_server import int4_mma_glu
        if not int4_mma_glu.on() or not int4_mma_glu.ready(self.mma_words.device):
            return None
        x2 = self._rows(x)
        side = self._prefetch(rows)
        y = int4_mma_glu.int4_mma_glu(x2, self.mma_words, self.mma_scales, self.group_size)
        self._joined(side)
        return None if y is None else y.reshape(*x.shape[:-1], self.out_features // 2)

    def _gemm_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(scales, zeros)`` the Triton GEMM and the prefill pass read: the paired words where held
        (``triton_paired``, passed as both), else the split scales and zeros."""
        paired = self._buffers.get("triton_paired")
        return (self.triton_scales, self.triton_zeros) if paired is None else (paired, paired)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the kernels take it: ``[rows, in_features]`` in the compute dtype, its inputs permuted where a
        GPTQ act-order checkpoint asks (``input_perm``)."""
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)
        return x2 if self.input_perm is None else x2.index_select(1, self.input_perm)

    def _prefetch(self, rows: int):
        """Start the next module's L2 prefetch if the engine asked (``l2_next``, model_server.l2_prefetch)."""
        nxt = self.__dict__.get("l2_next")
        if nxt is None:
            return None
        from model_server import l2_prefetch
        return l2_prefetch.ahead(nxt[0], rows, nxt[1])

    @staticmethod
    def _joined(side) -> None:
        if side is not None:
            from model_server import l2_prefetch
            l2_prefetch.join(side)

    def _forward(self, x: torch.Tensor, partials: bool) -> torch.Tensor:
        shape = x.shape
        x2 = self._rows(x)
        kernel = self.step_kernel(x2.shape[0])
        side = self._prefetch(x2.shape[0])
        if kernel == "mma":
            from model_server.int4_mma import int4_mma_mm
            y = int4_mma_mm(x2, self.mma_words, self.mma_scales, self.group_size)
        elif kernel == "gemv":
            from model_server.int4_gemv import int4_gemv_mm
            y = int4_gemv_mm(x2, self.triton_packed, self.triton_scales, self.triton_zeros, self.group_size)
        elif kernel == "triton-dequant":
            from model_server.int4_dequant import int4_dequant_mm
            y = int4_dequant_mm(x2, self.triton_packed, *self._gemm_scales(), self.group_size)
        elif kernel == "triton":
            from model_server.int4_triton import int4_triton_mm
            y = int4_triton_mm(x2, self.triton_packed, *self._gemm_scales(), self.group_size, partials=partials)
        elif kernel in ("cuda-int4pack", "cpu-int4pack"):  # the held layout's op (an mma layer's copy: CPU in tests)
            op = (torch.ops.aten._weight_int4pack_mm if self.int4pack_kernel == "cuda-int4pack" else
                  torch.ops.aten._weight_int4pack_mm_for_cpu)
            y = op(x2, self.weight_packed, self.group_size, self.scales_and_zeros)
        else:
            y = x2 @ self._unpacked().t()
        self._joined(side)
        if y.dim() == 3:                             # split-K partial sums (forward_partials)
            return y.reshape(y.shape[0], *shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        above = mma_max_rows(self.out_features) if self.kernel == "mma" else tinygemm_max_rows(self.out_features)
        rows = "" if not self.rows_kernel else (f", up to {GEMV_MAX_ROWS} rows={self.rows_kernel}"
                                                if self.rows_kernel == "gemv" else
                                                f", above {above} rows={self.rows_kernel}")
        small = f", up to {self.int4pack_rows} rows=cuda-int4pack" if self.int4pack_rows else ""
        return (f"in={self.in_features}, out={self.out_features}, group={self.group_size}, "
                f"kernel={self.kernel}{small}{rows}")


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
    model.int4_kernel_reason = choice.reason
    return len(targets)
