"""A loaded model and its EOS ids as the fast engine's constructor takes them in.

:func:`prepare_model` puts a non-quantized model on the device and in the dtype asked for (by default the
model's own, or fp16 for bf16 on a CUDA card without bf16: :func:`.support.default_dtype`); quantized models
(bitsandbytes 4-bit, GPTQ, INT4 weight-only) keep their layout and device. Either way the model is put in
eval mode. :func:`eos_id_set` turns the ``eos_token_ids`` argument (None, one id or several) into a set.

Owns that placement and that normalization, done once before the :class:`~.runner.ModelRunner` is built.
It must not check whether the engine supports the model (:mod:`.support`) nor touch the runner's buffers.
"""
from __future__ import annotations

import torch

from .support import default_dtype


def prepare_model(model: torch.nn.Module, device: str | torch.device | None,
                  dtype: torch.dtype | str | None) -> torch.nn.Module:
    """``model`` on ``device`` in ``dtype`` (names such as ``"float16"`` allowed), in eval mode; a quantized
    model is not moved or cast. Returns the model (``.to`` may return the same module)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    quantized = bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_quantized", False)
                     or getattr(model, "is_int4_weight_only", False))
    if dtype is None and not quantized:
        dtype = default_dtype(next(model.parameters()), device)
    if device is not None:
        device = torch.device(device)
        if not quantized and next(model.parameters()).device != device:
            model = model.to(device)
    if dtype is not None and not quantized and next(model.parameters()).dtype != dtype:
        model = model.to(dtype)
    model.eval()
    return model


def eos_id_set(eos_token_ids: list[int] | tuple[int, ...] | int | None) -> set[int]:
    """The ids that end a sequence, as a set (None: none)."""
    if eos_token_ids is None:
        return set()
    if isinstance(eos_token_ids, int):
        return {eos_token_ids}
    return {int(x) for x in eos_token_ids}
