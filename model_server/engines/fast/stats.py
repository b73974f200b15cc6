"""The fast engine's :class:`EngineStats` snapshot: its scheduler, step and runner counters in one record.

Owns which numbers the engine reports (``/metrics`` and ``/info`` export them, benchmarks read them).
It must not change the engine.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..base import EngineStats

if TYPE_CHECKING:
    from .engine import FastEngine


def snapshot(eng: "FastEngine") -> EngineStats:
    """The engine's counters and gauges now (reads only; written by the engine's loop thread)."""
    r = eng.runner
    st = eng.executor
    warm = eng.background
    return EngineStats(
        waiting_requests=len(eng.sched.pending),
        running_requests=eng.sched.running,
        max_batch_size=eng.max_batch,
        steps_total=st.steps,
        prefill_calls_total=st.prefill_calls,
        prefill_tokens_total=st.prefill_tokens,
        decode_tokens_total=st.decode_tokens,
        extra={
            "cuda_graphs": float(bool(r.graphs)),
            "cuda_graphs_captured": float(len(r.graphs)),
            "prefill_graphs_captured": float(len(r.prefill_graphs)),
            "prefill_calls_bucketed": float(r.prefill_calls["bucketed"]),
            "prefill_calls_eager": float(r.prefill_calls["eager"]),
            "prefills_in_decode_steps": float(st.mixed_prefills),
            "mixed_graphs_captured": float(len(r.mixed_graphs)),
            "fused_ops": float(r.ops.fused),
            "norm_kernel": float(getattr(r.ops, "norm_kernel", False)),
            "merged_projections": float(sum(m is not None for m in r.qkv + r.gate_up)),
            "decode_attn_kernel": float(r.decode_attn),
            "pick_kernel": float(r.picker.on),
            "gemv_linears": float(r.gemv_linears),
            "graph_capture_seconds": r.capture_seconds,
            "warm": float(warm is None or warm.applied.is_set()),
            "background_warmup_seconds": warm.seconds if warm is not None else 0.0,
            "kv_cache_bytes": float(r.cache.nbytes),
            "free_slots": float(r.cache.n_free),
            "decode_seconds_total": st.decode_seconds,
            "prefill_seconds_total": st.prefill_seconds,
        },
    )
