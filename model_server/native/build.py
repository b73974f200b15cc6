"""Assemble the native model from a checkpoint's tensors already on the device.

What :mod:`model_server.fast_load` does with transformers' model, without transformers: build on the meta
device (:func:`.modeling.build_on_meta`), cast the tensors to the target dtype where they are, assign them by
name (``load_state_dict(assign=True)``: no copy), tie the embeddings, compute the rotary buffers on the CPU
and place them (as transformers' ``_init_weights`` does), leave every parameter with ``requires_grad`` on and
the model in eval mode (as ``from_pretrained`` does). A GPTQ or AWQ checkpoint's linears go in as INT4 linears
(:mod:`model_server.int4_repack`). A key mismatch raises :class:`model_server.fast_load.DirectLoadUnsupported`,
and the caller falls back. Owns only that assembly.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from model_server.fast_load import WEIGHTS_NAME, DirectLoadUnsupported, _checkpoint_dtype, check_keys

from .config import generation_defaults, parse, read_json
from .modeling import NativeCausalLM, build_on_meta


def build_native(model_id: str, device: str, dtype: Any, state: dict[str, torch.Tensor]) -> NativeCausalLM:
    """The model of ``model_id`` in ``dtype`` (``"auto"``: config.json's, else the first floating weight's) from
    ``state`` (:func:`model_server.fast_load.read_weights`'s result: tensors are cast in place, then assigned)."""
    from safetensors import safe_open

    path = Path(model_id)
    raw = read_json(path / "config.json")
    config = parse(raw)
    linears: dict[str, Any] = {}
    if raw.get("quantization_config"):
        linears, dtype = _repacked_linears(raw, device, state)
        config.quantization_config = dict(raw["quantization_config"])
        config.tie_word_embeddings = config.tie_word_embeddings and "lm_head" not in linears
    elif dtype == "auto":
        dtype = _checkpoint_dtype(SimpleNamespace(dtype=config.dtype), path / WEIGHTS_NAME, safe_open)
    model = build_on_meta(config)
    for k, t in state.items():
        if t.is_floating_point() and t.dtype != dtype:
            state[k] = t.to(dtype)
    for name, linear in linears.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, linear)
    assemble(model, state, device, set(linears))
    if linears:
        first = next(iter(linears.values()))
        model.logical_parameters += sum(m.in_features * m.out_features for m in linears.values())
        model.is_int4_weight_only = True
        model.int4_group_size = first.group_size
        model.int4_kernel = first.kernel + (f"+{first.rows_kernel}" if first.rows_kernel else "")
        model.int4_kernel_reason = getattr(first, "kernel_reason", None)
    config.dtype = dtype
    config._name_or_path = model.name_or_path = str(model_id)
    model.generation_config = generation_defaults(path, config)
    model.eval()
    return model


def _repacked_linears(raw: dict[str, Any], device: str, state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], Any]:
    """A GPTQ or AWQ checkpoint's linears as INT4 linears (their tensors taken out of ``state``) and the compute dtype
    of :func:`model_server.int4_choice.device_compute`, which the rest of the model is cast to."""
    from model_server import int4_repack
    from model_server.int4 import device_compute

    choice = device_compute(device)
    try:
        return int4_repack.take_linears(state, int4_repack.spec(raw), choice), choice.dtype
    except int4_repack.RepackUnsupported as exc:
        raise DirectLoadUnsupported(str(exc)) from None


def assemble(model: NativeCausalLM, state: dict[str, torch.Tensor], device: str,
             prebuilt: frozenset[str] | set[str] = frozenset()) -> None:
    """Assign ``state`` into the meta-built ``model``, tie, place the rotary buffers; nothing may stay on meta.
    ``prebuilt``: modules already in place with their own tensors (repacked INT4 linears), not read from ``state``."""
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    expected = {k for k in model.state_dict() if not any(k.startswith(p + ".") for p in prebuilt)}
    check_keys(expected, set(state), tied)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.model.rotary_emb.reset_buffers(device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise DirectLoadUnsupported(f"tensors left on the meta device: {left[:3]}")
    for p in model.parameters():
        p.requires_grad_(True)
    # the unquantized parameter count, tied weights once (what /info reports; INT4 later replaces linears)
    model.logical_parameters = int(sum(p.numel() for p in model.parameters()))
