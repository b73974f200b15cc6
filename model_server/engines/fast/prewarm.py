"""Kernel pre-warm: run the fast engine's eager path once on a one-layer stand-in while the model loads.

A fresh process pays for its first eager forward far more than the forward itself: cuBLAS/cuBLASLt
handles and workspaces, loading each kernel's module on first use (CUDA lazy loading), the attention
backends' set-up, pinned host buffers, INT4 kernels (tinygemm, Triton's compile or its cache lookup).
On an H200 that was 2.8 s from ready to the first token of a 1B model (docs/benchmarks.md). Those costs
are per process, not per model, and most of them run in CUDA/C++ with the GIL released, so
:mod:`model_server.loading` runs :func:`prewarm` on a worker thread as soon as the weights are on the
device, while the main thread imports transformers and builds the model.

The stand-in is a one-layer model with the architecture's module names and real shapes (config.json),
whose weights are layer 0's and the embedding's tensors from the loaded state (read only, never
written) or, for INT4, its own quantized copies; it runs through :class:`.runner.ModelRunner` itself
(merged projections, bucketed eager prefill, eager decode, :func:`.sampling.select_tokens`), so the
kernels it loads are the ones the first request uses (with ``MODEL_SERVER_FAST_DECODE_ATTN=1``, the decode
attention kernel's too). Nothing it creates is shared with the served
model: it changes no output, only when the one-off costs are paid. Any failure is logged and ignored.

Owns the stand-in and the pre-warm run; when to run it is :mod:`model_server.loading`'s
(``MODEL_SERVER_PREWARM``: default on for CUDA, ``1`` forces it on CPU too, ``0`` turns it off).
"""
from __future__ import annotations

import logging
import os
import time
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

PROMPT_LENGTHS = (64, 5)        # a bucketed prefill (>= 16 tokens) and a short one
MAX_LEN = 256


def enabled(device: str) -> bool:
    """``MODEL_SERVER_PREWARM``: ``0`` off, ``1`` on, unset: on for CUDA only (CPU has no per-process
    kernel loading to hide, and its cores are busy importing)."""
    flag = os.environ.get("MODEL_SERVER_PREWARM", "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    return device == "cuda"


class _Norm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.variance_epsilon = eps


class _Rotary(nn.Module):
    """Shapes only: the pre-warm's cos/sin values do not matter."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, pos.shape[-1], self.head_dim)
        return torch.ones(shape, device=x.device), torch.zeros(shape, device=x.device)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    n, k = weight.shape
    lin = nn.Linear(k, n, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


def stand_in(config: dict[str, Any], state: dict[str, torch.Tensor], dtype: torch.dtype,
             int4_choice: Any = None, group_size: int = 128, repack: Any = None) -> nn.Module:
    """A one-layer model named like ``config``'s architecture, with layer 0's weights from ``state`` (cast
    to ``dtype`` where stored otherwise) and INT4 linears when ``int4_choice`` (``int4.ComputeChoice``): quantized
    here, or repacked from a GPTQ/AWQ checkpoint's tensors when ``repack`` (``int4_repack.RepackSpec``)."""
    arch = (config.get("architectures") or ["LlamaForCausalLM"])[0]
    heads, kv = int(config["num_attention_heads"]), int(config.get("num_key_value_heads") or config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    eps = float(config.get("rms_norm_eps", 1e-6))

    def w(key: str) -> torch.Tensor | None:
        t = state.get(key)
        return None if t is None else t if t.dtype == dtype else t.to(dtype)

    def lin(key: str) -> nn.Module:
        if repack is not None and key + ".qweight" in state:
            from model_server import int4_repack
            return int4_repack.repack({p: state[f"{key}.{p}"] for p in int4_repack.PARTS if f"{key}.{p}" in state},
                                      repack, int4_choice, key)
        layer = _linear(w(key + ".weight"), w(key + ".bias"))
        if int4_choice is None:
            return layer
        from model_server.int4 import Int4Linear, fits
        return Int4Linear(layer, group_size, int4_choice) if fits(layer, group_size, int4_choice.int4_kernel) else layer

    p = "model.layers.0."
    attn = nn.Module()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        setattr(attn, name, lin(p + "self_attn." + name))
    attn.head_dim, attn.scaling = head_dim, head_dim ** -0.5
    mlp = nn.Module()
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(mlp, name, lin(p + "mlp." + name))
    layer = nn.Module()
    layer.self_attn, layer.mlp = attn, mlp
    layer.input_layernorm = _Norm(w(p + "input_layernorm.weight"), eps)
    layer.post_attention_layernorm = _Norm(w(p + "post_attention_layernorm.weight"), eps)
    base = nn.Module()
    embed = w("model.embed_tokens.weight")
    # given its weight, nn.Embedding skips its init (normal_() on a meta tensor would import torch._dynamo)
    base.embed_tokens = nn.Embedding(embed.shape[0], hidden, _weight=embed, _freeze=True)
    base.layers = nn.ModuleList([layer])
    base.norm = _Norm(w("model.norm.weight"), eps)
    base.rotary_emb = _Rotary(head_dim)
    model = type(arch, (nn.Module,), {"__doc__": "one-layer stand-in (fast engine pre-warm)"})()
    model.model = base
    model.lm_head = _linear(w("lm_head.weight") if "lm_head.weight" in state else embed, None)
    model.config = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv, vocab_size=embed.shape[0],
                                   hidden_act=config.get("hidden_act", "silu"))
    return model


def prewarm(config: dict[str, Any], state: dict[str, torch.Tensor], dtype: torch.dtype, quantization: str,
            marks: dict[str, float] | None = None) -> float:
    """Run the stand-in's eager prefill (bucketed, then short), one eager decode step and token selection
    (greedy and sampled) on the state's device; returns the seconds taken and marks ``prewarm_end``."""
    from .factory import decode_attn_switch, pick_kernel_switch
    from .runner import ModelRunner
    from .sampling import SlotSampling, select_tokens

    t0 = time.monotonic()
    device = next(iter(state.values())).device
    choice = repack = None
    if config.get("quantization_config"):
        from model_server.int4_repack import spec
        repack = spec(config)               # the load repacks it (else it would not be on the direct path)
    if quantization == "int4" or repack is not None:
        from model_server.int4 import device_compute
        choice = device_compute(device)
        dtype = choice.dtype
    with torch.inference_mode():
        model = stand_in(config, state, dtype, choice, int(os.environ.get("MODEL_SERVER_INT4_GROUP_SIZE", "128")),
                         repack)
        # bucketed (padded) eager prefill as the engine runs it on CUDA before its graphs exist
        # where the engine uses the decode attention kernel (CUDA by default; MODEL_SERVER_FAST_DECODE_ATTN), the
        # decode step also runs its check (its compiles land in Triton's cache here, not at the first token)
        runner = ModelRunner(model, 2, MAX_LEN, use_cuda_graphs=False, fuse=False,
                             bucketed_prefill=device.type == "cuda",
                             decode_attn=decode_attn_switch(), pick_kernel=pick_kernel_switch())
        sampling = SlotSampling.allocate(2, runner.device)
        slot = torch.zeros(1, dtype=torch.int64, device=runner.device)
        for t in PROMPT_LENGTHS:
            logits = runner.prefill([0], [[0] * t])
            for sample in (False, True):
                tok, lp = select_tokens(logits, slot, sampling, torch.zeros_like(slot), sample, sample)
            torch.stack([tok.to(torch.float64), lp.to(torch.float64)]).cpu().tolist()
        runner.in_ids[:1] = tok
        runner.in_pos[:1] = PROMPT_LENGTHS[0]
        logits, picks = runner.decode_picks(1, PROMPT_LENGTHS[0] + 1)
        picks.cpu()
        del runner, model, logits
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.monotonic() - t0
    if marks is not None:
        marks["prewarm_end"] = time.time()
    return seconds


def prewarm_quietly(config: dict[str, Any], read: Any, dtype: Any, quantization: str,
                    marks: dict[str, float], release: bool = False) -> None:
    """:func:`prewarm` once ``read`` (the future of the loaded state: a dict nobody else changes meanwhile)
    is done; never raises. ``release``: empty that dict afterwards (it was this pre-warm's own view, and its
    tensors should not outlive the load through it)."""
    state: dict[str, Any] = {}
    try:
        state = read.result()
        if dtype == "auto" or not isinstance(dtype, torch.dtype):
            dtype = state["model.embed_tokens.weight"].dtype
        seconds = prewarm(config, state, dtype, quantization, marks)
        log.info("kernel pre-warm done in %.2f s", seconds)
    except Exception as exc:  # noqa: BLE001 - a missed pre-warm only costs time
        log.info("kernel pre-warm skipped: %s: %s", type(exc).__name__, str(exc)[:200])
    finally:
        if release:
            state.clear()
