"""Prefill inside a decode step: new prompts ride along as extra rows of the next decode step.

Without it, a request that arrives while others decode costs one extra forward pass (the prefill),
which reads every weight once more and stalls the whole batch; when arrivals are spread out (streams
finishing at different times, as they do behind HTTP) that is one extra pass per arrival or two. Here
up to ``segments`` prompt *segments* of ``seg_tokens`` tokens each are appended to a decode step's rows
(as vLLM's chunked prefill mixes prompt and decode tokens in one batch), so the linears read the weights
once for both, and at a few hundred rows they are still bound by those bytes, not by the extra rows.

A segment is up to ``seg_tokens`` consecutive prompt tokens of one sequence (a longer prompt takes
several segments of the same step). Every row, decode or prompt, writes its K/V at (slot, position)
before any row attends, so a prompt token attends to all earlier tokens of its own prompt, those of
earlier segments included, exactly as a causal prefill does. Decode rows attend as in a plain decode
step; each segment's queries attend over its slot's keys (one small gather), masked to keys at or before
each query's position. Padding (a short segment's tail, unused segments) writes into the scratch slot.
The logits returned are ``[b + segments, V]``: the ``b`` decode rows, then each segment's last real token.

Owns the chunk's static inputs (one int64 device buffer: ids, positions, slots per row; slot and last
row per segment), its host packing, the segment-count buckets and the mixed forward pass. It must not
choose which requests join a step (:mod:`.scheduler`) or sample (:mod:`.step`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .direct import run
from .graphs import capture_lazily
from .kv_cache import pick_bucket
from .layers import project_qkv, run_layers

if TYPE_CHECKING:
    from .runner import ModelRunner


def segment_buckets(max_segments: int) -> list[int]:
    """Powers of two up to ``max_segments``, and ``max_segments`` itself (a step pads its segments to one)."""
    out, s = [], 1
    while s < max_segments:
        out.append(s)
        s *= 2
    return sorted(set(out) | {max_segments}) if max_segments > 0 else []


def segments_needed(prompt_len: int, seg_tokens: int) -> int:
    """Segments a prompt takes: ``ceil(prompt_len / seg_tokens)``."""
    return -(-prompt_len // seg_tokens)


@dataclass
class ChunkLayout:
    """Offsets of the chunk buffer: ids, positions and slots (``rows`` each), then slot and last row
    (``segments`` each)."""

    rows: int          # segments x seg_tokens
    segments: int

    @property
    def size(self) -> int:
        return 3 * self.rows + 2 * self.segments

    def views(self, buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        r, s = self.rows, self.segments
        return buf[:r], buf[r:2 * r], buf[2 * r:3 * r], buf[3 * r:3 * r + s], buf[3 * r + s:3 * r + 2 * s]


class MixedInputs:
    """The static (graph) inputs of mixed steps for one runner."""

    def __init__(self, max_segments: int, seg_tokens: int, scratch_slot: int, max_len: int,
                 device: torch.device) -> None:
        self.max_segments = int(max_segments)
        self.seg_tokens = int(seg_tokens)
        self.buckets = segment_buckets(self.max_segments)
        self.scratch_slot = int(scratch_slot)
        self.max_len = int(max_len)
        self.layout = ChunkLayout(self.max_segments * self.seg_tokens, self.max_segments)
        self.buf = torch.zeros(max(self.layout.size, 1), dtype=torch.int64, device=device)
        self.ids, self.pos, self.slot, self.seg_slot, self.seg_last = self.layout.views(self.buf)

    def pack(self, host: torch.Tensor, parts: list[tuple[int, list[int], int]]) -> tuple[int, int]:
        """Write segments into the pinned host buffer ``host`` (``layout.size`` int64): ``parts`` is one
        ``(slot, tokens, start position)`` per segment, at most ``seg_tokens`` tokens each. Returns
        ``(segment bucket, longest position + 1)``; padding rows and segments go to the scratch slot."""
        t = self.seg_tokens
        s = next(b for b in self.buckets if b >= len(parts))
        ids, pos, slot, seg_slot, seg_last = self.layout.views(host)
        ids.zero_()
        slot.fill_(self.scratch_slot)
        seg_slot.fill_(self.scratch_slot)
        seg_last.zero_()
        pos.copy_(torch.arange(self.layout.rows, dtype=torch.int64) % t)
        need = 1
        for j, (sl, toks, start) in enumerate(parts):
            n = len(toks)
            lo = j * t
            ids[lo:lo + n] = torch.tensor(toks, dtype=torch.int64)
            pos[lo:lo + n] = torch.arange(start, start + n, dtype=torch.int64)
            slot[lo:lo + n] = sl
            seg_slot[j] = sl
            seg_last[j] = lo + n - 1
            need = max(need, start + n)
        pos.clamp_(max=self.max_len - 1)
        return s, need


def mixed_forward(r: "ModelRunner", mx: MixedInputs, b: int, length: int, s: int) -> torch.Tensor:
    """Logits ``[b + s, V]``: decode rows ``0..b-1`` (``in_ids``/``in_pos``) and ``s`` prompt segments
    (``mx``'s inputs) in one pass; every position read is ``< length``."""
    t = mx.seg_tokens
    n_c = s * t
    kv, g, d = r.n_kv, r.group, r.head_dim
    pos = torch.cat([r.in_pos[:b], mx.pos[:n_c]])
    slots = torch.cat([r.rows[:b], mx.slot[:n_c]])
    h = run(r.embed, torch.cat([r.in_ids[:b], mx.ids[:n_c]]))[:, None, :]   # [b + n_c, 1, hidden]
    cos = r.cos[pos][:, None, None, :]
    sin = r.sin[pos][:, None, None, :]
    mask_d = r.visible_mask(pos[:b], length)[:, None, None, :]                      # [b, 1, 1, L]
    mask_c = r.visible_mask(mx.pos[:n_c], length).view(s, t, 1, length)             # [s, t, 1, L]
    mask_c = mask_c.expand(s, t, g, length).reshape(s, 1, t * g, length)
    seg_slot = mx.seg_slot[:s]

    def attend(li: int, layer, x: torch.Tensor) -> torch.Tensor:
        attn = layer.self_attn
        q, k, v = project_qkv(r, li, attn, x)
        n = q.shape[0]
        q = q.view(n, kv, g, d)
        k = k.view(n, kv, 1, d)
        v = v.view(n, kv, 1, d)
        q, k = r.ops.rope(q, k, cos, sin)
        kc = r.cache.k[li]
        vc = r.cache.v[li]
        kc[slots, :, pos] = k[:, :, 0]                       # every row's K/V first, then attention
        vc[slots, :, pos] = v[:, :, 0]
        o_d = F.scaled_dot_product_attention(q[:b], kc[:b, :, :length], vc[:b, :, :length],
                                             attn_mask=mask_d, scale=r.scaling)             # [b, kv, g, d]
        q_c = q[b:].view(s, t, kv, g, d).permute(0, 2, 1, 3, 4).reshape(s, kv, t * g, d)
        k_c = kc[:, :, :length].index_select(0, seg_slot)                                 # [s, kv, L, d]
        v_c = vc[:, :, :length].index_select(0, seg_slot)
        o_c = F.scaled_dot_product_attention(q_c, k_c, v_c, attn_mask=mask_c, scale=r.scaling)
        o_c = o_c.view(s, kv, t, g, d).permute(0, 2, 1, 3, 4).reshape(n_c, 1, kv * g * d)
        o = torch.cat([o_d.reshape(b, 1, kv * g * d), o_c])
        return run(attn.o_proj, o)

    x = run_layers(r, h, attend)
    last = torch.cat([r.rows[:b], b + mx.seg_last[:s]])
    return run(r.lm_head, x[last, 0, :])


def run_mixed(r: "ModelRunner", b_needed: int, len_needed: int, s: int) -> torch.Tensor:
    """One mixed step over decode rows ``0..b_needed-1`` and ``s`` segments (a segment bucket), positions all
    ``< len_needed``: the graph of (batch bucket, length bucket, s) if captured, else eagerly (recording
    that graph for next time where graphs are on). Returns logits ``[b + s, V]``, ``b`` the batch bucket."""
    b = pick_bucket(r.batch_buckets, b_needed)
    length = pick_bucket(r.length_buckets, len_needed)
    key = (b, length, s)
    entry = r.mixed_graphs.get(key)
    if entry is not None:
        entry[0].replay()
        return entry[1]
    out = mixed_forward(r, r.mixed, b, length, s)
    if r.use_graphs and r.mixed_graphs_on and (r.lazy_graphs or r.graphs):    # graphs are live
        capture_lazily(r, "mixed", key, lambda: mixed_forward(r, r.mixed, b, length, s))
    return out
