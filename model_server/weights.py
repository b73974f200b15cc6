"""What a loaded model holds: bytes of its tensors as stored, and its logical parameter count.

Owns the counting rules (each storage once; bitsandbytes quantization state, int8 scales and GPTQ
kernel tensors included). It must not load, move or change a model (:mod:`model_server.loading`
loads; this module only reads tensors' sizes).
"""
from __future__ import annotations

from typing import Any


def _tensor_bytes(t) -> int:
    return int(t.numel()) * int(t.element_size())


def measure_weight_bytes(model) -> int:
    """Bytes of every parameter and persistent buffer as stored, counted once per storage.

    Quantized layers count what they really hold: bitsandbytes 4-bit packed uint8 data plus its
    quantization state (absmax, nested absmax/code), int8 data plus scales, GPTQ qweight/qzeros/scales.
    """
    import torch

    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        key = (t.data_ptr(), t.numel())
        if key in seen:
            return
        seen.add(key)
        total += _tensor_bytes(t)

    def add_quant_state(qs) -> None:
        if qs is None:
            return
        for attr in ("absmax", "code"):
            add(getattr(qs, attr, None))
        add_quant_state(getattr(qs, "state2", None))

    for module in model.modules():
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        for p in module.parameters(recurse=False):
            add(p)
            add_quant_state(getattr(p, "quant_state", None))
            add(getattr(p, "SCB", None))
        for name, b in module.named_buffers(recurse=False):
            if name not in non_persistent:
                add(b)
        add(getattr(module, "SCB", None))
        if hasattr(module, "qweight"):
            # GPTQ kernels keep derived tensors as plain attributes (gptqmodel CPU: scales_and_zeros, ret_idx)
            for value in vars(module).values():
                add(value)
    return total


def count_parameters(model, config: dict[str, Any] | None) -> int:
    """Logical parameter count (what the unquantized model would have), tied weights counted once.

    :mod:`model_server.native`'s model carries it (``logical_parameters``, counted before quantizing), so
    this needs no transformers there."""
    import torch

    counted = getattr(model, "logical_parameters", 0)
    if isinstance(counted, int) and counted > 0:
        return counted

    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.for_model(**{k: v for k, v in model.config.to_dict().items()
                                      if k != "quantization_config"})
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(cfg)
        return int(sum(p.numel() for p in meta.parameters()))
    except Exception:  # unusual architectures: fall back to counting what is loaded
        return int(sum(p.numel() for p in model.parameters()))
