"""The model's forward pass, driven layer by layer over our static KV cache, plus decode CUDA graphs.

We keep transformers' modules and weights (``LlamaForCausalLM``, ``Qwen2ForCausalLM``; bf16/fp16/fp32
or bitsandbytes 4-bit linears) and call them ourselves, in the same order and dtypes as their
``forward``: embed -> per layer [input_layernorm, q/k/v proj, rotary (cos/sin from the model's own
rotary-embedding module, so llama3 rope scaling is honoured), write K/V at each row's position,
attention, o_proj, residual, post_attention_layernorm, mlp, residual] -> norm -> lm_head.

Decode attention folds the ``heads / kv_heads`` query heads that share a KV head into the query-length
axis (``q: [b, kv_heads, group, head_dim]``), which is exactly grouped-query attention without copying
K/V, and masks keys past each row's position. The step attends over a *length bucket* (smallest
bucket covering the longest live row) so KV bytes read scale with the live context.

On CUDA, one graph is captured per (batch bucket, length bucket); a decode step is then a few
host-to-device copies plus one graph replay. Prefill (batched, right-padded, causal; graphed per prefill
bucket) is :mod:`.prefill`'s.

Owns the decode forward pass, the static graph inputs (decode, prefill, :mod:`.mixed`'s), the KV cache
and the bucket choice; the prefill pass is :mod:`.prefill`'s, a decode step with prompt segments
:mod:`.mixed`'s, and the layer stack around attention that all three run :mod:`.layers`'. Capturing
graphs is :mod:`.graphs`' and which models qualify :mod:`.support`'s. It must not schedule requests or
sample tokens (:mod:`.scheduler`, :mod:`.step`).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .decode_attn import on_by_default as decode_attn_default
from .decode_attn import decode_attention
from .decode_attn import self_check as decode_attn_check
from .direct import run
from .fused import Ops
from .graphs import capture_decode, capture_lazily, capture_prefill
from .greedy_kernel import GreedyPicker
from .kv_cache import StaticKVCache, default_batch_buckets, default_length_buckets, pick_bucket
from .layers import project_out, project_qkv, run_layers
from .merged import merge
from .mixed import MixedInputs
from .prefill import prefill_forward, run_prefill
from .rope_kv import available as rope_kv_available
from .rope_kv import rope_kv_write
from .rope_prefill import usable as rope_prefill_usable
from .support import check_supported

log = logging.getLogger(__name__)

# prefill passes of up to this many padded tokens run as graph replays (MODEL_SERVER_FAST_PREFILL_GRAPH_TOKENS): 4,096
# holds a burst of 64 prompts of 64 tokens, the 64-stream wave's prefill, which eagerly took INT4 38.5 ms and bf16 22.5
# on an H200 and graphed 22.6 / 22.1, with the same greedy tokens graphed and eager (H100, 2026-12-07; docs/benchmarks.md,
# "The wave's prefill as one graph" and "The 4,096-token prefill graphs checked")
DEFAULT_PREFILL_GRAPH_TOKENS = 4096


class ModelRunner:
    """Owns the KV cache, the static decode inputs and the captured graphs for one model."""

    def __init__(self, model: torch.nn.Module, max_batch: int, max_seq_len: int,
                 use_cuda_graphs: bool | None = None, batch_buckets: list[int] | None = None,
                 length_buckets: list[int] | None = None, fuse: bool | None = None,
                 prefill_graph_tokens: int | None = None, bucketed_prefill: bool | None = None,
                 lazy_graphs: bool = False, merge_projections: bool = True, mixed_segments: int = 0,
                 mixed_tokens: int = 64, rope_kv: bool | None = None, decode_attn: bool | None = None,
                 pick_kernel: bool | None = None) -> None:
        check_supported(model)
        # lazy: capture no graph at start; a bucket's first use runs eagerly (its real result is
        # served) and records its graph for the next use (cold start: the first token needs no capture)
        self.lazy_graphs = bool(lazy_graphs)
        self.lazy_pools: dict[str, object] = {}
        self.model = model
        base = model.model
        cfg = model.config
        self.layers = list(base.layers)
        self.embed = base.embed_tokens
        self.norm = base.norm
        self.lm_head = model.lm_head
        attn0 = self.layers[0].self_attn
        self.head_dim = int(attn0.head_dim)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(cfg.num_key_value_heads)
        self.group = self.n_heads // self.n_kv
        self.scaling = float(attn0.scaling)
        self.dtype = self.embed.weight.dtype
        self.device = self.embed.weight.device
        self.vocab = int(self.lm_head.out_features if hasattr(self.lm_head, "out_features") else cfg.vocab_size)
        self.max_batch = int(max_batch)
        self.max_len = int(max_seq_len)
        self.cache = StaticKVCache.allocate(len(self.layers), self.max_batch, self.n_kv, self.max_len,
                                            self.head_dim, self.dtype, self.device, scratch=1)
        self.scratch_slot = self.max_batch
        # cos/sin for every position, computed once by the model's own rotary module (elementwise, so
        # identical to what its forward computes per step).
        pos = torch.arange(self.max_len, device=self.device)[None, :]
        dummy = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = base.rotary_emb(dummy, pos)
        self.cos = cos[0].to(self.dtype).contiguous()   # [max_len, head_dim]
        self.sin = sin[0].to(self.dtype).contiguous()
        # static decode inputs (graph inputs): token ids and write positions per slot
        self.in_ids = torch.zeros(self.max_batch, dtype=torch.int64, device=self.device)
        self.in_pos = torch.zeros(self.max_batch, dtype=torch.int64, device=self.device)
        self.rows = torch.arange(self.max_batch, dtype=torch.int64, device=self.device)
        self.key_idx = torch.arange(self.max_len, dtype=torch.int64, device=self.device)
        self._mask_open = torch.zeros((), dtype=self.dtype, device=self.device)
        self._mask_shut = torch.full((), float("-inf"), dtype=self.dtype, device=self.device)
        self.batch_buckets = sorted(set(b for b in (batch_buckets or default_batch_buckets(self.max_batch))
                                        if 0 < b <= self.max_batch) | {self.max_batch})
        self.length_buckets = sorted(set(b for b in (length_buckets or default_length_buckets(self.max_len))
                                         if 0 < b <= self.max_len) | {self.max_len})
        if use_cuda_graphs is None:
            use_cuda_graphs = self.device.type == "cuda"
        self.use_graphs = bool(use_cuda_graphs) and self.device.type == "cuda"
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.graph_error: str | None = None
        self.capture_seconds = 0.0
        self.fuse_requested = (self.device.type == "cuda") if fuse is None else bool(fuse)
        self.ops = Ops(False)
        self.silu_mlp = getattr(cfg, "hidden_act", "silu") == "silu" and all(
            hasattr(layer.mlp, n) for layer in self.layers for n in ("gate_proj", "up_proj", "down_proj"))
        self.norms = [(layer.input_layernorm, layer.post_attention_layernorm) for layer in self.layers]
        # q/k/v and gate/up as one GEMM each where the linears allow it (.merged; None: call the parts)
        self.qkv = [merge([la.self_attn.q_proj, la.self_attn.k_proj, la.self_attn.v_proj]) if merge_projections
                    else None for la in self.layers]
        self.gate_up = [merge([la.mlp.gate_proj, la.mlp.up_proj]) if merge_projections and self.silu_mlp
                        else None for la in self.layers]
        # bucketed (padded, graphed on CUDA) prefill; on CPU it can be forced on to test the padding
        self.bucketed_prefill = self.use_graphs if bucketed_prefill is None else bool(bucketed_prefill)
        self._bucketed_forced = bucketed_prefill is not None
        cap = DEFAULT_PREFILL_GRAPH_TOKENS if prefill_graph_tokens is None else int(prefill_graph_tokens)
        t_buckets = [t for t in (16, 32, 64, 128, 256, 512) if t <= min(cap, self.max_len)]
        self.prefill_buckets: list[tuple[int, int]] = sorted(
            (n, t) for t in t_buckets for n in self.batch_buckets if n * t <= cap)
        max_n = max((n for n, _ in self.prefill_buckets), default=1)
        max_t = max((t for _, t in self.prefill_buckets), default=1)
        pin = self.device.type == "cuda"
        self.p_ids = torch.zeros(max_n, max_t, dtype=torch.int64, device=self.device)
        self.p_slots = torch.full((max_n,), self.scratch_slot, dtype=torch.int64, device=self.device)
        self.p_last = torch.zeros(max_n, dtype=torch.int64, device=self.device)
        self.p_rows = torch.arange(max_n, dtype=torch.int64, device=self.device)
        self._p_stage = torch.zeros(max_n * max_t + 2 * max_n, dtype=torch.int64, pin_memory=pin)
        self.prefill_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.prefill_graph_error: str | None = None
        self.prefill_calls = {"bucketed": 0, "eager": 0}
        # prompts prefilled inside decode steps (.mixed): their static inputs and (lazily captured) graphs
        self.mixed = MixedInputs(mixed_segments, mixed_tokens, self.scratch_slot, self.max_len, self.device)
        self.mixed_graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.mixed_graphs_on = True
        # rotary + K/V cache write as one kernel in decode (.rope_kv): None = with the fused ops on a CUDA
        # bf16/fp16 model, True = always (Triton, or its interpreter), False = never; Triton is imported
        # at the first step that uses it, not here (cold start)
        self.rope_kv = (rope_kv is not False and all(m is not None for m in self.qkv)
                        and (rope_kv is True or (self.device.type == "cuda"
                                                 and self.dtype in (torch.bfloat16, torch.float16))))
        self._rope_kv_forced = rope_kv is True
        # decode attention as one Triton kernel (.decode_attn): None = on a CUDA bf16/fp16 model when Triton is
        # there (faster than SDPA on an H200, docs/benchmarks.md), True = always (Triton, or its interpreter),
        # False = SDPA; either way it is checked against SDPA before its first step (_decode_attn_ok)
        self.decode_attn = decode_attn is True or (
            decode_attn is None and decode_attn_default(self.device.type, self.dtype, self.head_dim))
        self.decode_attn_error: str | None = None        # why it was turned off at its first use (self_check)
        # a prefill's rotary as one Triton kernel (.rope_prefill) where MODEL_SERVER_FAST_PREFILL_ROPE=triton asks for it
        self.prefill_rope = rope_prefill_usable(self.head_dim)
        # the greedy pick after the LM head as two Triton kernels (.greedy_kernel; None = on CUDA with Triton)
        self.picker = GreedyPicker(self.device, pick_kernel)
        self.gemv_linears = 0      # linears on the one-row bf16 GEMV (factory.install_gemv sets it)
        self._decode_attn_checked = False

    def prepare(self) -> None:
        """Compile the fused elementwise ops (CUDA) and capture the decode graphs; first the mma GLU epilogue's check
        (on unless ``MODEL_SERVER_INT4_MMA_GLU=0``), as the background warm-up does, so any graph holds it."""
        from model_server import int4_mma_glu
        int4_mma_glu.check_where_served([m for m in self.gate_up if m is not None])
        if self.fuse_requested:
            self.ops = Ops(True, self.device, self.dtype)
            # compile every prefill shape family now (batch 1 / >1, one token / more), not on a request
            for n, t in ((1, 1), (1, 3), (2, 1), (2, 3)):
                if n <= self.max_batch and t < self.max_len:
                    self.prefill(list(range(n)), [[0] * t for _ in range(n)])
        if self.lazy_graphs and self.use_graphs:
            return
        capture_decode(self)
        if self.use_graphs:
            capture_prefill(self)
        elif not self._bucketed_forced:
            self.bucketed_prefill = False       # no graphs: padding would only add work

    # ------------------------------------------------------------------ decode
    def visible_mask(self, pos: torch.Tensor, length: int) -> torch.Tensor:
        """``[n, length]`` additive attention mask (0 / -inf in the model's dtype) of keys at or before each
        query's position ``pos [n]``: made once per step (given a bool mask, attention converts it in every
        layer, two more kernels per layer)."""
        return torch.where(self.key_idx[:length][None, :] <= pos[:, None], self._mask_open, self._mask_shut)

    def decode_forward(self, b: int, length: int) -> torch.Tensor:
        """Logits ``[b, V]`` for one new token per row ``0..b-1`` (ids ``in_ids``, positions ``in_pos``)."""
        ids = self.in_ids[:b]
        pos = self.in_pos[:b]
        rows = self.rows[:b]
        h = run(self.embed, ids)[:, None, :]                                   # [b, 1, hidden]
        own_attn = self.decode_attn and self._decode_attn_ok()
        mask = None if own_attn else self.visible_mask(pos, length)[:, None, None, :]   # [b,1,1,L]
        kv, g, d = self.n_kv, self.group, self.head_dim
        one_kernel = (self.rope_kv and (self.ops.fused or self._rope_kv_forced)
                      and rope_kv_available(self.head_dim))
        if not one_kernel:
            cos = self.cos[pos][:, None, None, :]                         # [b, 1, 1, D]
            sin = self.sin[pos][:, None, None, :]

        def attend(li: int, layer, x: torch.Tensor) -> torch.Tensor:
            attn = layer.self_attn
            kc = self.cache.k[li]
            vc = self.cache.v[li]
            if one_kernel:
                y = project_out(self.qkv[li].fn, x)     # [b, 1, (H + 2 KV) * D], or [S, b, 1, ...] partials
                q = rope_kv_write(y.squeeze(-2), self.cos, self.sin, pos, rows, kc, vc, self.n_heads, kv)
                q = q.view(b, kv, g, d)
            else:
                q, k, v = project_qkv(self, li, attn, x)
                q = q.view(b, kv, g, d)
                k = k.view(b, kv, 1, d)
                v = v.view(b, kv, 1, d)
                q, k = self.ops.rope(q, k, cos, sin)
                kc[rows, :, pos] = k[:, :, 0]
                vc[rows, :, pos] = v[:, :, 0]
            if own_attn:
                o = decode_attention(q, kc, vc, pos, length, self.scaling)
            else:
                o = F.scaled_dot_product_attention(q, kc[:b, :, :length], vc[:b, :, :length],
                                                   attn_mask=mask, scale=self.scaling)   # [b, kv, g, d]
            return project_out(attn.o_proj, o.reshape(b, 1, self.n_heads * d))

        x = run_layers(self, h, attend)
        return run(self.lm_head, x[:, 0, :])

    def _decode_attn_ok(self) -> bool:
        """The decode attention kernel agrees with SDPA here (checked once, never while a graph is captured);
        if not, it is turned off with a warning and ``decode_attn_error`` says why."""
        if not self._decode_attn_checked:
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return False
            self._decode_attn_checked = True
            self.decode_attn_error = decode_attn_check(self.device, self.dtype, self.n_kv, self.group,
                                                       self.head_dim, self.scaling)
            if self.decode_attn_error is not None:
                self.decode_attn = False
                log.warning("decode attention kernel off, using SDPA: %s", self.decode_attn_error)
        return self.decode_attn

    def decode_and_pick(self, b: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`decode_forward` plus each row's greedy token and logprob, packed ``[b, 2]`` float64, with
        the tokens written into ``in_ids`` (what a CUDA graph records: an all-greedy step then launches
        nothing after the replay but the copy down; a sampling step overwrites ``in_ids`` afterwards)."""
        logits = self.decode_forward(b, length)
        return logits, self.picker.pick(logits, self.in_ids[:b])

    def decode_picks(self, b_needed: int, len_needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one decode step over rows ``0..b_needed-1`` whose positions are all ``< len_needed``.

        Returns logits ``[b, V]`` and the greedy picks ``[b, 2]`` (:meth:`decode_and_pick`) with ``b >=
        b_needed`` (the bucket); rows past ``b_needed`` are padding."""
        b = pick_bucket(self.batch_buckets, b_needed)
        length = pick_bucket(self.length_buckets, len_needed)
        entry = self.graphs.get((b, length))
        if entry is not None:
            entry[0].replay()
            return entry[1]
        out = self.decode_and_pick(b, length)
        if self.lazy_graphs and self.use_graphs:
            capture_lazily(self, "decode", (b, length), lambda: self.decode_and_pick(b, length))
        return out

    def decode(self, b_needed: int, len_needed: int) -> torch.Tensor:
        """The logits ``[b, V]`` of :meth:`decode_picks` (``b`` the batch bucket)."""
        return self.decode_picks(b_needed, len_needed)[0]

    # ------------------------------------------------------------------ prefill (.prefill)
    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Run the prompts (right-padded, causal) writing K/V into their slots; logits ``[n, V]`` of each
        prompt's last position (:func:`.prefill.run_prefill`)."""
        return run_prefill(self, slots, prompts)

    def prefill_static(self, nb: int, tb: int) -> torch.Tensor:
        """The prefill of bucket ``(nb, tb)`` over the static prefill inputs (what a prefill graph records)."""
        return prefill_forward(self, self.p_ids[:nb, :tb], self.p_slots[:nb], self.p_last[:nb], self.p_rows[:nb])
