"""Prefill: prompts run as one right-padded, causal pass that writes their K/V into their slots.

A short prefill run eagerly is bound by the host, not the GPU: ~300 kernel launches from Python for a 1B
model (~7 ms bf16, ~13 ms NF4, whatever the prompt length), paid between two decode steps every time a
request arrives. So prefill is also graphed: prompts are padded to a *prefill bucket* (rows x tokens,
``n_b * t_b <= prefill_graph_tokens``), one graph per bucket; padding rows write their K/V into a
scratch slot, padding columns write past the prompt where decode overwrites before reading. Batches
that fit no bucket run eagerly.

Owns the prefill forward pass, the bucket choice and the packing of prompts into the static prefill
inputs (which, with the graphs, live on the :class:`~.runner.ModelRunner`). It must not schedule.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .direct import run
from .graphs import capture_lazily
from .layers import project_qkv, run_layers
from .rope_prefill import rope_prefill

if TYPE_CHECKING:
    from .runner import ModelRunner


def prefill_forward(r: "ModelRunner", ids: torch.Tensor, slot_idx: torch.Tensor, last: torch.Tensor,
                     rows: torch.Tensor) -> torch.Tensor:
    """Prompts ``ids [n, t]`` (right-padded, causal), K/V written into ``slot_idx``; logits ``[n, V]``
    at positions ``last``."""
    n, t = ids.shape
    h = run(r.embed, ids)                                              # [n, t, hidden]
    cos = r.cos[:t][None, None]                                    # [1, 1, t, D]
    sin = r.sin[:t][None, None]
    kv, d = r.n_kv, r.head_dim

    def attend(li: int, layer, x: torch.Tensor) -> torch.Tensor:
        attn = layer.self_attn
        q, k, v = project_qkv(r, li, attn, x)
        v = v.view(n, t, kv, d).transpose(1, 2)
        if r.prefill_rope:                                         # one kernel, token-major in and out (.rope_prefill)
            q, k = rope_prefill(q.view(n, t, r.n_heads, d), k.view(n, t, kv, d), r.cos, r.sin)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        else:
            q, k = r.ops.rope(q.view(n, t, r.n_heads, d).transpose(1, 2), k.view(n, t, kv, d).transpose(1, 2),
                              cos, sin)
        r.cache.k[li][slot_idx, :, :t] = k
        r.cache.v[li][slot_idx, :, :t] = v
        if r.group > 1:
            k = k[:, :, None].expand(n, kv, r.group, t, d).reshape(n, r.n_heads, t, d)
            v = v[:, :, None].expand(n, kv, r.group, t, d).reshape(n, r.n_heads, t, d)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=r.scaling)
        return run(attn.o_proj, o.transpose(1, 2).reshape(n, t, r.n_heads * d))

    x = run_layers(r, h, attend)                                   # final-normed
    return run(r.lm_head, x[rows, last])


def prefill_bucket(r: "ModelRunner", n: int, t: int) -> tuple[int, int] | None:
    """The smallest prefill bucket (fewest padded tokens) holding ``n`` prompts of up to ``t`` tokens."""
    best = None
    for nb, tb in r.prefill_buckets:
        if nb >= n and tb >= t and (best is None or nb * tb < best[0] * best[1]):
            best = (nb, tb)
    return best


def run_prefill(r: "ModelRunner", slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
    """Run the prompts (right-padded, causal) writing K/V into their slots; logits ``[n, V]`` of each
    prompt's last position."""
    n = len(prompts)
    lens = [len(p) for p in prompts]
    t = max(lens)
    bucket = prefill_bucket(r, n, t) if r.bucketed_prefill else None
    if bucket is not None:
        nb, tb = bucket
        # one host buffer -> one copy: ids [nb, tb] | slots [nb] | last [nb]
        stage = r._p_stage[: nb * tb + 2 * nb]
        stage.zero_()
        ids_h = stage[: nb * tb].view(nb, tb)
        for i, p in enumerate(prompts):
            ids_h[i, : len(p)] = torch.tensor(p, dtype=torch.int64)
        stage[nb * tb: nb * tb + nb] = r.scratch_slot
        stage[nb * tb: nb * tb + n] = torch.tensor(slots, dtype=torch.int64)
        stage[nb * tb + nb: nb * tb + nb + n] = torch.tensor([x - 1 for x in lens], dtype=torch.int64)
        dev = stage.to(r.device, non_blocking=True)
        r.p_ids[:nb, :tb].copy_(dev[: nb * tb].view(nb, tb))
        r.p_slots[:nb].copy_(dev[nb * tb: nb * tb + nb])
        r.p_last[:nb].copy_(dev[nb * tb + nb:])
        r.prefill_calls["bucketed"] += 1
        entry = r.prefill_graphs.get(bucket)
        if entry is not None:
            entry[0].replay()
            return entry[1][:n]
        out = r.prefill_static(nb, tb)[:n]
        if r.lazy_graphs and r.use_graphs:
            capture_lazily(r, "prefill", bucket, lambda: r.prefill_static(nb, tb))
        return out
    r.prefill_calls["eager"] += 1
    ids_host = torch.zeros(n, t, dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids_host[i, : len(p)] = torch.tensor(p, dtype=torch.int64)
    ids = ids_host.to(r.device, non_blocking=True)
    slot_idx = torch.tensor(slots, dtype=torch.int64).to(r.device, non_blocking=True)
    last = torch.tensor([x - 1 for x in lens], dtype=torch.int64).to(r.device, non_blocking=True)
    return prefill_forward(r, ids, slot_idx, last, torch.arange(n, device=r.device))
