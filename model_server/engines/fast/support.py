"""Which models the fast engine drives (Llama and Qwen2 causal LMs with full attention and static rope),
and in which dtype by default.

Owns the support check that the engine's constructor runs and its default compute dtype; a model that fails it gets
:class:`UnsupportedModel` (the server then falls back to the transformers engine). It must not
change the model.
"""
from __future__ import annotations

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


class UnsupportedModel(ValueError):
    """The fast engine cannot drive this model; the server should use the transformers engine."""


def check_supported(model: torch.nn.Module) -> None:
    """Raise :class:`UnsupportedModel` unless the fast engine reproduces this model's forward exactly."""
    name = type(model).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModel(f"fast engine supports {', '.join(SUPPORTED_ARCHITECTURES)}, not {name}")
    cfg = model.config
    if getattr(cfg, "use_sliding_window", False):
        raise UnsupportedModel("sliding-window attention is not supported by the fast engine")
    types = getattr(cfg, "layer_types", None)
    if types and any(t != "full_attention" for t in types):
        raise UnsupportedModel("only full-attention layers are supported by the fast engine")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) in ("dynamic", "longrope"):
        raise UnsupportedModel("position-dependent rope (dynamic/longrope) is not supported")


def default_dtype(param: torch.Tensor, device: torch.device | str | None) -> torch.dtype | None:
    """The model's own dtype, except bf16 on a CUDA card below compute capability 8.0 (T4: no bf16): fp16."""
    dev = torch.device(device) if device is not None else param.device
    if param.dtype != torch.bfloat16 or dev.type != "cuda":
        return None
    from model_server.int4 import device_compute

    return device_compute(dev).dtype
