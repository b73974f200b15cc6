"""``from_loaded``: the fast engine as ``model-server serve`` builds it, with the environment's switches.

Owns reading the ``MODEL_SERVER_FAST_*`` switches (A/B knobs for benchmarks, cold-start modes) into
:class:`.engine.FastEngine`'s keyword arguments; explicit keyword arguments win. It must not run the
engine.
"""
from __future__ import annotations

import logging
import os

from model_server import switches

from .engine import FastEngine

log = logging.getLogger(__name__)
GEMV_ROWS_SWITCH = "MODEL_SERVER_FAST_GEMV_ROWS"


def decode_attn_switch() -> bool | None:
    """``MODEL_SERVER_FAST_DECODE_ATTN``: ``1`` decode attention as one Triton kernel instead of SDPA everywhere (the
    interpreter's on CPU), ``0`` SDPA, unset None (the kernel on CUDA, SDPA elsewhere)."""
    return switches.flag("MODEL_SERVER_FAST_DECODE_ATTN")


PREFILL_GRAPH_TOKENS_SWITCH = "MODEL_SERVER_FAST_PREFILL_GRAPH_TOKENS"
MAX_PREFILL_TOKENS_SWITCH = "MODEL_SERVER_FAST_MAX_PREFILL_TOKENS"


def pick_kernel_switch() -> bool | None:
    """``MODEL_SERVER_FAST_PICK_KERNEL``: ``1`` a decode step's greedy pick as two Triton kernels everywhere (the
    interpreter's on CPU), ``0`` the eager ops, unset None (the kernels on CUDA)."""
    return switches.flag("MODEL_SERVER_FAST_PICK_KERNEL")


def from_loaded(loaded, max_batch: int = 64, max_total_tokens: int = 2048, **kwargs) -> FastEngine:
    """Build a :class:`FastEngine` from ``model_server.loading.LoadedModel`` (what ``serve`` holds).

    ``max_total_tokens`` (prompt + generated, per sequence) is capped at the model's context length.
    Raises :class:`UnsupportedModel` for architectures the fast engine cannot drive.
    """
    ctx = int(getattr(loaded, "context_length", 0) or 0)
    max_len = min(int(max_total_tokens), ctx) if ctx > 0 else int(max_total_tokens)
    # A/B switch for benchmarks: MODEL_SERVER_FAST_PREFILL_GRAPHS=0 restores eager prefill
    if os.environ.get("MODEL_SERVER_FAST_PREFILL_GRAPHS", "").strip() == "0":
        kwargs.setdefault("bucketed_prefill", False)
    # cold start: MODEL_SERVER_FAST_LAZY_GRAPHS=1 captures each graph on its bucket's first use;
    # MODEL_SERVER_FAST_BACKGROUND_WARMUP=1 serves eagerly while compiling (implies lazy graphs)
    if os.environ.get("MODEL_SERVER_FAST_LAZY_GRAPHS", "").strip() == "1":
        kwargs.setdefault("lazy_graphs", True)
    if os.environ.get("MODEL_SERVER_FAST_BACKGROUND_WARMUP", "").strip() == "1":
        kwargs.setdefault("background_warmup", True)
    # A/B switch for benchmarks: MODEL_SERVER_FAST_MERGE=0 keeps q/k/v and gate/up as separate GEMMs
    if os.environ.get("MODEL_SERVER_FAST_MERGE", "").strip() == "0":
        kwargs.setdefault("merge_projections", False)
    # A/B switch for benchmarks: MODEL_SERVER_FAST_OVERLAP_PREFILL=0 reads a prefill's first tokens before
    # the next decode step is launched (the device waits for the host around every prefill)
    if os.environ.get("MODEL_SERVER_FAST_OVERLAP_PREFILL", "").strip() == "0":
        kwargs.setdefault("overlap_prefill", False)
    # A/B switch for benchmarks: MODEL_SERVER_FAST_ROPE_KV=0 keeps decode's rotary and K/V writes as separate ops
    if os.environ.get("MODEL_SERVER_FAST_ROPE_KV", "").strip() == "0":
        kwargs.setdefault("rope_kv", False)
    # MODEL_SERVER_FAST_FUSE=1 compiles the fused elementwise ops off CUDA too (CPU: CI's compile-cache tests)
    fuse = switches.flag("MODEL_SERVER_FAST_FUSE")
    if fuse is not None:
        kwargs.setdefault("fuse", fuse)
    attn = decode_attn_switch()
    if attn is not None:
        kwargs.setdefault("decode_attn", attn)
    pick = pick_kernel_switch()
    if pick is not None:
        kwargs.setdefault("pick_kernel", pick)
    # prompts prefilled inside decode steps: segments per step (0 = a prefill pass for every arrival), tokens each
    for name, key in (("MODEL_SERVER_FAST_MIXED_SEGMENTS", "mixed_segments"), ("MODEL_SERVER_FAST_MIXED_TOKENS",
                      "mixed_tokens"), ("MODEL_SERVER_FAST_MIXED_MIN_SEGMENTS", "mixed_min_segments")):
        value = switches.integer(name)
        if value is not None:
            kwargs.setdefault(key, value)
    # prompt tokens (rows x padded length) up to which a prefill pass is graphed: MODEL_SERVER_FAST_PREFILL_GRAPH_TOKENS;
    # a pass's budget when nothing decodes (at least the longest sequence): MODEL_SERVER_FAST_MAX_PREFILL_TOKENS
    for name, key in ((PREFILL_GRAPH_TOKENS_SWITCH, "prefill_graph_tokens"),
                      (MAX_PREFILL_TOKENS_SWITCH, "max_prefill_tokens")):
        tokens = switches.integer(name)
        if tokens is not None:
            if tokens < 16:
                raise switches.SwitchValueError(f"{name} must be a token count >= 16, got {tokens}")
            kwargs.setdefault(key, tokens)
    gemv_on, gemv_rows = gemv_switch() is not False, gemv_rows_switch()    # read first: a bad value fails early
    from model_server.l2_prefetch import mode as l2_mode
    l2_how = l2_mode()
    eng = FastEngine(loaded.model, list(loaded.eos_token_ids), max_batch=max_batch, max_seq_len=max_len, **kwargs)
    if gemv_on:     # bf16 linears of 1..gemv_rows rows on model_server.gemv_bf16 (CUDA only)
        install_gemv(eng, gemv_rows)
    if l2_how != "off":
        install_l2_prefetch(eng, l2_how)
    return eng


def l2_chain(runner) -> list:
    """The runner's INT4 linears in the order a decode step runs them: per layer q/k/v (merged where merged), o,
    gate/up (merged where merged), down. The LM head is left out (it does not fit in L2)."""
    from model_server.int4 import Int4Linear
    order: list[object] = []
    for li, layer in enumerate(runner.layers):
        att, mlp = layer.self_attn, layer.mlp
        order += [runner.qkv[li].fn] if runner.qkv[li] is not None else [att.q_proj, att.k_proj, att.v_proj]
        order.append(att.o_proj)
        if runner.silu_mlp:
            order += [runner.gate_up[li].fn] if runner.gate_up[li] is not None else [mlp.gate_proj, mlp.up_proj]
            order.append(mlp.down_proj)
    return [m for m in order if isinstance(m, Int4Linear)]


def install_l2_prefetch(eng: FastEngine, how: str) -> int:
    """Each INT4 linear of :func:`l2_chain` prefetches the next one's weights into L2 (:mod:`model_server.l2_prefetch`,
    ``how`` ``inline`` or ``side``; measured slower on an H100, so off by default). Returns how many linears prefetch
    (0 off CUDA, below compute capability 9.0 or without INT4 linears)."""
    from model_server import l2_prefetch
    r = eng.runner
    if r.device.type != "cuda" or not l2_prefetch.usable(r.device.index or 0):
        return 0
    return l2_prefetch.link(l2_chain(r), how)


def gemv_switch() -> bool | None:
    """``MODEL_SERVER_FAST_GEMV``: ``0`` one-row bf16 linears stay on cuBLAS, ``1`` or unset: the CUDA GEMV
    (:mod:`model_server.gemv_bf16`) where the engine runs on CUDA and the kernel passes its check."""
    return switches.flag("MODEL_SERVER_FAST_GEMV")


def gemv_rows_switch() -> int:
    """``MODEL_SERVER_FAST_GEMV_ROWS``: the most rows a step's bf16 linear runs the GEMV at, 1..8; unset: 1 (one-row
    steps only, as measured). More is experimental: the multi-row kernel is not yet measured on a GPU. Anything else
    raises :class:`SwitchValueError`."""
    from model_server.gemv_bf16 import MAX_ROWS
    value = switches.integer(GEMV_ROWS_SWITCH)
    if value is not None and not 1 <= value <= MAX_ROWS:
        raise switches.SwitchValueError(f"{GEMV_ROWS_SWITCH} must be 1..{MAX_ROWS} (the GEMV's rows), got {value}")
    return 1 if value is None else value


def install_gemv(eng: FastEngine, max_rows: int = 1) -> int:
    """Route the engine's bf16 linears (the model's and the merged projections) through the GEMV kernel for inputs of
    1..``max_rows`` rows where it passes its check on the engine's device; returns how many (0 with one warning when
    it does not pass at one row; one row only, with a warning, when it passes there but not at more)."""
    from model_server import gemv_bf16
    r = eng.runner
    models = [r.model, *(m for m in r.qkv + r.gate_up if m is not None)]
    if r.device.type != "cuda" or not any(gemv_bf16.eligible(m) for m in models):
        return 0                                      # e.g. INT4 or fp16 linears only: no compile, no check
    err = gemv_bf16.check(r.device, max_rows)
    if err is not None and max_rows > 1 and gemv_bf16.check(r.device) is None:
        log.warning("the bf16 GEMV runs one-row steps only (%s=%d not used): %s", GEMV_ROWS_SWITCH, max_rows, err)
        err, max_rows = None, 1
    if err is not None:
        log.warning("the one-row bf16 GEMV is not used (cuBLAS stays): %s", err)
        return 0
    r.gemv_linears = sum(gemv_bf16.install(m, max_rows) for m in models)
    return r.gemv_linears
