"""Background warm-up: compile the fused ops on a worker thread while the engine serves eagerly.

Cold start used to wait for ``torch.compile`` (dynamo tracing of the fused elementwise ops, even with a
warm inductor cache) before the first request. With background warm-up the engine is ready as soon as
the model is loaded: requests run eagerly (unfused ops, no CUDA graphs) while this thread compiles
the fused ops by running the model's own forward passes on a *shadow* runner (the same model and
modules, its own two-slot KV cache and inputs, so nothing the engine reads or writes is touched) for
every shape family the engine meets (batch 1 and more, prompts of 1 and more tokens, decode). When it
is done the engine thread switches between two steps: fused ops on, lazy CUDA graphs on. From then on
the engine runs exactly the fused, graphed path it runs without background warm-up.

When the compile starts: compiling is seconds of Python holding the GIL, and an eager step (hundreds of op
launches, each taking the GIL back) that shares it with the compile runs many times slower (on an H100 the first
request's tokens after the first came ~0.5 s apart while the compile ran; docs/benchmarks.md). So the worker waits
``hold_s`` for a first request (``MODEL_SERVER_FAST_WARMUP_HOLD_S``, default 0.5 s) and starts when none comes;
once requests are served (:meth:`BackgroundWarmup.served`) it waits until the engine has nothing to do
(:meth:`BackgroundWarmup.idle`: a scale-from-zero burst is served whole at the eager path's speed), or at most
``max_defer_s`` (``MODEL_SERVER_FAST_WARMUP_MAX_DEFER_S``, default 10 s) under load that never pauses. While it
compiles, the thread switch interval is ``switch_interval_s`` (``MODEL_SERVER_FAST_WARMUP_SWITCH_INTERVAL_S``,
default 10 us; 0 leaves it alone), so the engine thread gets the GIL back sooner after each op; the previous
interval is restored when the compile ends.

First of all, where INT4 layers run the CUDA mma kernel, the thread compiles (NVRTC, or loads from the compile cache)
every configuration steps of 1-16 rows can pick, without waiting for its turn: that is host work with the GIL
released, and a configuration not compiled ahead would be compiled on the engine thread at its first such step.

No graph is captured while this thread runs (capture must not overlap other threads' CUDA work):
the runner's lazy capture is switched on only at the switch. A compile failure leaves the ops eager
(as :class:`.fused.Ops` does in the foreground) and still switches graphs on.

Owns the worker thread, the shadow runner and the switch; how a forward runs is :mod:`.runner`'s.
"""
from __future__ import annotations

import copy
import logging
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable

import torch

from model_server import switches

from .fused import Ops
from .kv_cache import StaticKVCache

if TYPE_CHECKING:
    from .runner import ModelRunner

log = logging.getLogger(__name__)

HOLD_S = 0.5              # longest the compile waits for a first request
MAX_DEFER_S = 10.0        # longest the compile waits, once requests are served, for the engine to be idle
SWITCH_INTERVAL_S = 1e-5  # sys.setswitchinterval while compiling (CPU, 16 layers: the first request 2.0 -> 0.8 s)
SHADOW_SLOTS = 2          # batch 1 and batch > 1: the two decode / prefill shape families
SHADOW_LEN = 32
PROMPT_LENGTHS = (1, 3, 16)


def shadow_runner(runner: "ModelRunner", ops: Ops) -> "ModelRunner":
    """A runner sharing ``runner``'s model, modules and rotary tables, with its own small KV cache,
    static inputs and no graphs: running it never touches what the engine's runner reads or writes."""
    s = copy.copy(runner)
    n = min(SHADOW_SLOTS, runner.max_batch)
    length = min(SHADOW_LEN, runner.max_len)
    s.max_batch, s.max_len, s.scratch_slot = n, length, n
    s.cache = StaticKVCache.allocate(len(runner.layers), n, runner.n_kv, length, runner.head_dim, runner.dtype,
                                     runner.device, scratch=1)
    dev = runner.device
    s.in_ids = torch.zeros(n, dtype=torch.int64, device=dev)
    s.in_pos = torch.zeros(n, dtype=torch.int64, device=dev)
    s.rows = torch.arange(n, dtype=torch.int64, device=dev)
    s.batch_buckets, s.length_buckets = list(range(1, n + 1)), [length]
    s.use_graphs = s.lazy_graphs = s.bucketed_prefill = False
    s.graphs, s.prefill_graphs, s.lazy_pools = {}, {}, {}
    s.prefill_calls = {"bucketed": 0, "eager": 0}
    s.ops = ops
    return s


def compile_families(shadow: "ModelRunner") -> None:
    """Run every shape family of the fused ops through ``shadow`` (each first call compiles it)."""
    for n in range(1, shadow.max_batch + 1):
        for t in PROMPT_LENGTHS:
            if t <= shadow.max_len:
                shadow.prefill(list(range(n)), [[0] * t for _ in range(n)])
        shadow.in_ids.zero_()
        shadow.in_pos.zero_()
        shadow.decode_forward(n, shadow.max_len)


class BackgroundWarmup:
    """Compile on a worker thread; :meth:`apply` (engine thread, between steps) switches the runner."""

    def __init__(self, runner: "ModelRunner", lazy_graphs: bool = True,
                 make_ops: Callable[..., Ops] = Ops, hold_s: float | None = None,
                 max_defer_s: float | None = None, switch_interval_s: float | None = None) -> None:
        self.runner = runner
        self.hold_s = max(0.0, _setting(hold_s, "MODEL_SERVER_FAST_WARMUP_HOLD_S", HOLD_S))
        self.max_defer_s = max(0.0, _setting(max_defer_s, "MODEL_SERVER_FAST_WARMUP_MAX_DEFER_S", MAX_DEFER_S))
        self.switch_interval_s = max(0.0, _setting(switch_interval_s, "MODEL_SERVER_FAST_WARMUP_SWITCH_INTERVAL_S",
                                                   SWITCH_INTERVAL_S))
        self._serving = threading.Event()     # the engine has served a prefill
        self._go = threading.Event()          # ... and has since had nothing to do: compile now
        self.deferred_s = 0.0                 # how long the compile waited for the engine (after hold_s)
        self.compile_started: float | None = None     # wall-clock epoch seconds (/info startup.fused_compile_start)
        self.fuse = runner.fuse_requested
        self.lazy_graphs = bool(lazy_graphs)
        self.make_ops = make_ops
        from model_server import int4_precompile
        self.precompile_int4 = int4_precompile.enabled()     # compile-cache fill: every INT4 GEMM variant too
        # the CUDA mma kernel's configurations, compiled first on every start (not only by compile-cache fill)
        mods = [m for m in (getattr(runner, "model", None), *getattr(runner, "qkv", ()), *getattr(runner, "gate_up", ()))
                if m is not None]
        self.mma_modules = mods if int4_precompile.mma_layers(mods) else []
        self.glu_layers = [m for m in getattr(runner, "gate_up", ()) if m is not None]   # merged gate/up: mma GLU
        self.mma_compiled = 0                 # configurations compiled or loaded from the cache
        self.ops: Ops | None = None
        self.error: str | None = None
        self.seconds = 0.0
        self.done = threading.Event()         # the worker finished (ops ready or failed)
        self.applied = threading.Event()      # the engine runs the fused path from now on
        self.on_done: Callable[[], None] | None = None    # the engine's wake-up (the worker calls it)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not self.fuse and not self.precompile_int4 and not self.mma_modules:   # nothing to compile: switch at once
            self.done.set()
            return
        self._thread = threading.Thread(target=self._work, name="fast-engine-warmup", daemon=True)
        self._thread.start()

    def served(self) -> None:
        """Engine thread, after a prefill: requests are being served; the compile waits until they are done."""
        self._serving.set()

    def idle(self) -> None:
        """Engine thread, with nothing to do: a compile waiting for served requests to finish may start."""
        if self._serving.is_set():
            self._go.set()

    def _wait_for_turn(self) -> None:
        """``hold_s`` with no request, else until the engine is idle, at most ``max_defer_s`` after serving began."""
        if not self._serving.wait(self.hold_s):
            return
        t0 = time.monotonic()
        self._go.wait(self.max_defer_s)
        self.deferred_s = time.monotonic() - t0

    def _compile_mma(self) -> None:
        """Every mma kernel configuration the model's layers can pick (NVRTC or the compile cache; ctypes calls that
        release the GIL, no GPU work there): before the hold, since the engine thread would otherwise compile a row
        class's configuration at its first such step, with every stream of that step waiting. With the mma GLU epilogue on
        (the default; ``MODEL_SERVER_INT4_MMA_GLU=0`` off), its first-use check too: a small trial on the GPU, before
        any graph."""
        from model_server import int4_precompile
        t0 = time.monotonic()
        try:
            self.mma_compiled = int4_precompile.precompile_mma(self.mma_modules, self.glu_layers)
        except Exception as exc:  # noqa: BLE001 - a configuration not compiled here compiles at its first use
            log.warning("int4 mma kernel configurations not compiled ahead: %s: %s", type(exc).__name__, exc)
            return
        from model_server import int4_mma_glu
        int4_mma_glu.check_where_served(self.glu_layers)    # a warning if it fails; until it passes, unfused
        log.info("INT4 mma kernel configurations compiled or loaded: %d in %.2f s", self.mma_compiled,
                 time.monotonic() - t0)

    def _work(self) -> None:
        if self.mma_modules:
            self._compile_mma()
        if self.fuse or self.precompile_int4:
            self._wait_for_turn()
            self._compile_on_stream()
        self.done.set()
        if self.on_done is not None:
            self.on_done()

    def _compile_on_stream(self) -> None:
        self.compile_started = time.time()
        t0 = time.monotonic()
        r = self.runner
        interval = sys.getswitchinterval()
        try:
            if self.switch_interval_s > 0:
                sys.setswitchinterval(self.switch_interval_s)
            with torch.inference_mode():
                if r.device.type == "cuda":
                    stream = torch.cuda.Stream(device=r.device)
                    with torch.cuda.device(r.device), torch.cuda.stream(stream):
                        self._compile()
                    torch.cuda.synchronize(r.device)
                else:
                    self._compile()
        except Exception as exc:  # noqa: BLE001 - the engine keeps serving eagerly
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("background warm-up failed, elementwise ops stay eager: %s", self.error)
            self.ops = None
        finally:
            sys.setswitchinterval(interval)
        self.seconds = time.monotonic() - t0
        log.info("background warm-up done in %.2f s after waiting %.2f s for served requests (fused ops %s)",
                 self.seconds, self.deferred_s, "on" if self.ops is not None and self.ops.fused else "off")

    def _compile(self) -> None:
        r = self.runner
        if self.precompile_int4:
            from model_server import int4_precompile
            from model_server.int4_triton_config import glu_on
            merged = [m for m in (*r.qkv, *r.gate_up) if m is not None]
            glu = [m.fn for m in r.gate_up if m is not None] if glu_on() else []
            n = int4_precompile.precompile([r.model, *merged], r.max_batch * r.max_len, glu)
            log.info("INT4 GEMM variants precompiled: %d launches", n)
        if not self.fuse:
            return
        ops = self.make_ops(True, r.device, r.dtype)
        if ops.fused:
            shadow = shadow_runner(r, ops)
            compile_families(shadow)
            del shadow
        self.ops = ops

    def apply(self) -> bool:
        """Engine thread only: once the worker is done, switch to the fused ops and lazy graphs (once).
        Returns whether the switch has happened."""
        if self.applied.is_set():
            return True
        if not self.done.is_set():
            return False
        r = self.runner
        if self._thread is not None:
            self._thread.join()                 # no CUDA work left on another thread before any capture
        if self.ops is not None:
            r.ops = self.ops
        if r.use_graphs and self.lazy_graphs:
            r.lazy_graphs = True
        self.applied.set()
        return True


def _setting(given: float | None, switch: str, default: float) -> float:
    """``given``, else the switch's value (:func:`model_server.switches.seconds`), else ``default``."""
    if given is not None:
        return given
    value = switches.seconds(switch)
    return default if value is None else value


def startup_marks(engine: object) -> dict[str, float]:
    """``/info`` ``startup`` marks of an engine's background warm-up: ``fused_compile_start`` (epoch seconds),
    when its compile began; none for an engine without one."""
    warm = getattr(engine, "background", None)
    started = getattr(warm, "compile_started", None)
    return {} if started is None else {"fused_compile_start": started}
