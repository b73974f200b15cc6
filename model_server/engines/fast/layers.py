"""The decoder-layer stack every forward pass of the fast engine shares, around its attention.

Decode (:mod:`.runner`), prefill (:mod:`.prefill`) and mixed steps (:mod:`.mixed`) differ only in how a
layer attends; each passes an ``attend(li, layer, x) -> o_proj output`` to :func:`run_layers`, which runs
the rest of every layer in transformers' order: input_layernorm, attention, residual,
post_attention_layernorm, mlp (down(SiLU(gate) * up) through the runner's ops, or the model's own mlp),
residual; then the final norm. :func:`project_qkv` gives an ``attend`` the layer's q/k/v (one merged
GEMM where :mod:`.merged` built one).

Owns the layer order, the norms and residual adds (through the runner's ``ops``), the q/k/v projections,
the MLP, and which projections may hand their split-K partial sums to their consumer (:func:`project_out`).
It must not attend, write the KV cache, choose buckets or hold state of its own: what it reads (layers,
``ops``, merged projections) lives on the :class:`~.runner.ModelRunner`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .direct import hooked, run

if TYPE_CHECKING:
    from .runner import ModelRunner


def norm_eps(norm: torch.nn.Module) -> float:
    """An RMSNorm module's epsilon (``variance_epsilon`` in transformers, ``eps`` elsewhere)."""
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def mlp(r: "ModelRunner", li: int, layer, x: torch.Tensor) -> torch.Tensor:
    """Layer ``li``'s MLP on ``x``: down(SiLU(gate) * up) through the runner's ops, or the model's own mlp."""
    if r.silu_mlp:
        m = layer.mlp
        gu = r.gate_up[li]
        act = gu.silu_mul(x) if gu is not None else None      # from the GEMM's epilogue where it can (INT4 GLU)
        if act is None:
            gate, up = run(gu, x) if gu is not None else (run(m.gate_proj, x), run(m.up_proj, x))
            act = r.ops.silu_mul(gate, up)
        return project_out(m.down_proj, act)
    return run(layer.mlp, x)


def project_out(mod: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)`` for a projection whose consumer can add split-K partial sums itself: an INT4 linear may give them
    instead (one more leading dimension; ``Int4Linear.forward_partials``). Consumers: the residual add + norm after
    the o and down projections (:func:`run_layers`), the decode step's rotary + K/V write after the merged q/k/v
    (:func:`.rope_kv.rope_kv_write`)."""
    fn = getattr(mod, "forward_partials", None)
    return run(mod, x) if fn is None or hooked(mod) else fn(x)


def _add_norm(ops, h: torch.Tensor, o: torch.Tensor, weight: torch.Tensor,
              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``ops.add_rms_norm(h, o)``, or where ``o`` is split-K partial sums, the same with their sum."""
    if o.dim() > h.dim():
        return ops.add_parts_rms_norm(h, o, weight, eps)
    return ops.add_rms_norm(h, o, weight, eps)


def project_qkv(r: "ModelRunner", li: int, attn,
                x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer ``li``'s q, k and v projections of ``x`` (one GEMM where they were merged)."""
    fused = r.qkv[li]
    if fused is not None:
        return run(fused, x)
    return run(attn.q_proj, x), run(attn.k_proj, x), run(attn.v_proj, x)


def run_layers(r: "ModelRunner", h: torch.Tensor, attend) -> torch.Tensor:
    """Run every decoder layer; ``attend(li, layer, x) -> o_proj output``. Returns the final-norm output.

    Residual adds are fused with the following norm: ``h = h + o; x = norm(h)``, exactly HF's order; an ``o`` (or
    MLP output) of split-K partial sums (:func:`project_out`) is summed first, inside the same fused op.
    """
    ops = r.ops
    ln0 = r.layers[0].input_layernorm
    x = ops.rms_norm(h, ln0.weight, norm_eps(ln0))
    n = len(r.layers)
    for li, layer in enumerate(r.layers):
        o = attend(li, layer, x)
        post = layer.post_attention_layernorm
        h, x = _add_norm(ops, h, o, post.weight, norm_eps(post))
        m = mlp(r, li, layer, x)
        nxt = r.layers[li + 1].input_layernorm if li + 1 < n else r.norm
        h, x = _add_norm(ops, h, m, nxt.weight, norm_eps(nxt))
    return x
