"""``FastEngine``: continuous batching over a fixed-slot KV cache, decode via CUDA graphs.

Construction: ``FastEngine(model, eos_token_ids, max_batch=64, max_seq_len=2048, ...)``; ``model-server serve
--engine fast`` calls :mod:`.factory`'s ``from_loaded(loaded, max_batch, max_total_tokens)``, which wraps it.

* ``model``: a loaded ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (any dtype; bitsandbytes 4-bit
  linears work), already on its device. Other architectures raise :class:`UnsupportedModel` from the
  constructor, so the caller can fall back to the transformers engine.
* ``eos_token_ids``: ids that end a sequence (unless the request sets ``ignore_eos``); the EOS token
  itself is delivered as the final event with ``finish_reason="eos_token"``.
* ``max_batch``: KV slots = the most sequences decoded together; ``max_seq_len``: prompt + new tokens
  per sequence (longer prompts get an ``error`` event; ``max_new_tokens`` is capped to fit, and such a
  request ends with ``length``).
* ``device``/``dtype``: default to the model's (a bf16 model on a CUDA card below compute capability
  8.0 is cast to fp16, see ``model_server.int4.choose_compute``); a non-quantized model is cast to
  ``dtype`` if given. INT4 weight-only models (``--quantization int4``) keep their layout.
* ``use_cuda_graphs``: default on for CUDA. If capture fails, decode runs eagerly (see ``stats().extra``).
* ``fuse``: default on for CUDA: RMSNorm(+residual), rotary and SiLU*up each become one kernel through
  ``torch.compile`` (compiled at ``start()``, ~10-40 s once per process; eager if compiling fails).
  This sets two process-wide torch settings: inductor's ``emulate_precision_casts`` (round where eager
  rounds) and a dynamo recompile limit of at least 64.
* ``merge_projections``: default on: q/k/v and gate/up each run as one GEMM (``.merged``; exact, no extra
  memory; NF4 linears stay separate). ``MODEL_SERVER_FAST_MERGE=0`` through ``from_loaded`` turns it off.
* ``start()`` does the device work of warm-up (compile, one graph per batch bucket x length bucket); all
  later device work happens on the engine's own thread.
* ``lazy_graphs`` (``MODEL_SERVER_FAST_LAZY_GRAPHS=1`` through ``from_loaded``): ``start()`` captures no
  graph; a bucket's first step runs eagerly and records its graph for later steps (a one-off stall
  of one capture, tens of ms), so a cold start reaches its first token without capturing ~50 graphs.
* ``background_warmup`` (``MODEL_SERVER_FAST_BACKGROUND_WARMUP=1`` through ``from_loaded``; ``serve``'s
  default): ``start()`` compiles nothing; requests run eagerly while :mod:`.warmup` compiles the fused
  ops on a worker thread, then the engine switches to fused ops + lazy graphs between two steps
  (``wait_warm()``; ``on_warm`` is called on the engine thread at the switch). Implies lazy graphs.
* ``mixed_segments`` / ``mixed_tokens`` (default 0: off, a prefill pass per admission): a request arriving
  while others decode is prefilled inside the next decode step, as up to ``mixed_segments`` prompt
  segments of ``mixed_tokens`` tokens (:mod:`.mixed`; ``MODEL_SERVER_FAST_MIXED_SEGMENTS`` / ``_TOKENS``);
  ``mixed_min_segments`` (``_MIN_SEGMENTS``): wait (at most 10 ms) until arrivals fill that many.
* ``rope_kv``: decode's rotary and K/V cache write as one Triton kernel (:mod:`.rope_kv`; default: with the
  fused ops on a CUDA bf16/fp16 model; ``MODEL_SERVER_FAST_ROPE_KV=0`` through ``from_loaded``: off);
  ``decode_attn``: decode attention as one Triton kernel (:mod:`.decode_attn`; default: on a CUDA bf16/fp16
  model when Triton imports; checked against SDPA first; ``MODEL_SERVER_FAST_DECODE_ATTN=0``: SDPA);
  ``pick_kernel``: a decode step's greedy pick as two Triton kernels (:mod:`.greedy_kernel`; default on CUDA
  with Triton, checked against the eager ops first; ``MODEL_SERVER_FAST_PICK_KERNEL=0``: the eager ops).
* ``overlap_prefill``: default on: a prefill's first tokens are read after decode step k+1 (which already
  holds the prefilled rows) is launched, so the device never idles while the host handles a prefill
  (``MODEL_SERVER_FAST_OVERLAP_PREFILL=0`` through ``from_loaded``: read them first, the old order).

Loop: one background thread owns every device operation. Each turn it applies cancellations,
admits waiting requests (launches their prefill), launches decode step k+1 and then reads step k's
tokens and the prefill's first tokens, and hands tokens to the consumers with one ``loop.call_soon_threadsafe`` per asyncio loop per step.
This module owns that loop and the engine's lifecycle; :mod:`.delivery` hands the events to the consumers,
and :mod:`.model_prep` readies the model (device, dtype, eval mode) and the EOS ids the constructor is given.
Who runs and finishes is :mod:`.scheduler`'s; how a step runs on the device is :mod:`.step`'s and
the model's forward pass :mod:`.runner`'s. It must not make scheduling decisions nor touch tensors.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import AsyncIterator, Callable

import torch

from ..base import Engine, EngineStats, GenerationRequest, RequestTiming, TokenEvent
from . import delivery
from .model_prep import eos_id_set, prepare_model
from .runner import ModelRunner
from .scheduler import Out, Scheduler, Seq
from .stats import snapshot
from .step import InFlight, PrefillInFlight, StepExecutor
from .warmup import BackgroundWarmup

log = logging.getLogger(__name__)


class FastEngine(Engine):
    name = "fast"
    supports_seed = True      # per-request seeded sampling (sampling.seeded_uniform)

    def __init__(self, model: torch.nn.Module, eos_token_ids: list[int] | tuple[int, ...] | int | None,
                 max_batch: int = 64, max_seq_len: int = 2048, device: str | torch.device | None = None,
                 dtype: torch.dtype | str | None = None, *, use_cuda_graphs: bool | None = None,
                 max_prefill_tokens: int = 8192, batch_buckets: list[int] | None = None,
                 length_buckets: list[int] | None = None, fuse: bool | None = None,
                 step_prefill_tokens: int = 2048, prefill_graph_tokens: int | None = None,
                 bucketed_prefill: bool | None = None, lazy_graphs: bool = False,
                 merge_projections: bool = True, background_warmup: bool = False,
                 overlap_prefill: bool = True, mixed_segments: int = 0, mixed_tokens: int = 64,
                 mixed_min_segments: int = 1, rope_kv: bool | None = None,
                 decode_attn: bool | None = None, pick_kernel: bool | None = None) -> None:
        model = prepare_model(model, device, dtype)        # device, dtype, eval mode (.model_prep)
        eos = eos_id_set(eos_token_ids)
        self.eos_ids = eos
        self.max_batch = int(max_batch)
        self.max_seq_len = int(max_seq_len)
        self.max_prefill_tokens = max(int(max_prefill_tokens), self.max_seq_len)
        # padded prefill tokens admitted between two decode steps while sequences are decoding (at
        # least one request is always admitted): bounds the stall an arrival adds to everyone's ITL
        self.step_prefill_tokens = max(1, int(step_prefill_tokens))
        self.runner = ModelRunner(model, self.max_batch, self.max_seq_len, use_cuda_graphs,
                                  batch_buckets, length_buckets, fuse, prefill_graph_tokens,
                                  bucketed_prefill, lazy_graphs and not background_warmup, merge_projections,
                                  max(0, int(mixed_segments)), max(1, int(mixed_tokens)), rope_kv,
                                  decode_attn, pick_kernel)
        # background: no compile and no capture before the worker is done (.warmup switches both on)
        self._warm = BackgroundWarmup(self.runner) if background_warmup else None
        self.on_warm: Callable[[], None] | None = None
        self.device = self.runner.device
        self.sched = Scheduler(self.runner.cache, self.max_batch, self.max_seq_len, self.max_prefill_tokens,
                               self.step_prefill_tokens, eos)
        self.executor = StepExecutor(self.runner, self.max_batch)
        self._inflight: InFlight | None = None     # the launched decode step not yet collected
        self.overlap_prefill = overlap_prefill     # launch decode k+1 before reading a prefill's first tokens
        self.mixed_min_segments = max(1, int(mixed_min_segments))
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._stopping = False
        self._accepting = False

    # ------------------------------------------------------------------ public API
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="fast-engine", daemon=True)
        self._thread.start()
        await asyncio.get_running_loop().run_in_executor(None, self._ready.wait)
        if self._start_error is not None:
            raise RuntimeError(f"fast engine failed to start: {self._start_error}") from self._start_error
        self._accepting = True

    async def stop(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        self._accepting = False
        if drain:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.sched.busy():
                await asyncio.sleep(0.01)
        with self.sched.cv:
            self._stopping = True
            self.sched.cv.notify_all()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30.0)
            self._thread = None
        # anything left: tell its consumer
        for s in self.sched.drop_all():
            delivery.send(s, [TokenEvent(None, finish_reason="cancelled")])

    def submit(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        queue = delivery.EventQueue()
        seq, error = self._queue(request, asyncio.get_running_loop(), queue)
        if error is not None:
            queue.put_nowait(TokenEvent(None, finish_reason="error", error=error))
        return delivery.stream(seq, self.cancel)

    def submit_to(self, request: GenerationRequest, sink, tag) -> str | None:
        """Queue ``request`` with its own delivery (``model_server.engine_hub``: API worker processes).
        Once per step, ``sink.call_soon_threadsafe(fn, [(tag, [TokenEvent, ...]), ...])`` is called from
        the engine thread with every event of that step for requests sharing ``sink``; ``fn`` is not
        needed. Returns why the request was refused (nothing is delivered then), or None."""
        return self._queue(request, sink, tag)[1]

    def _queue(self, request: GenerationRequest, loop, queue) -> tuple[Seq, str | None]:
        seq = Seq(req=request, loop=loop, queue=queue, arrival_ns=request.arrival_ns or time.monotonic_ns(),
                  max_new=int(request.params.max_new_tokens))
        error = self.sched.refusal(seq, self._accepting) or self.sched.enqueue(seq)
        seq.done = error is not None
        return seq, error

    def cancel(self, request_id: str) -> None:
        dropped = self.sched.cancel(request_id)
        if dropped is not None:
            delivery.send(dropped, [TokenEvent(None, finish_reason="cancelled")])

    def stats(self) -> EngineStats:
        return snapshot(self)

    @property
    def background(self) -> BackgroundWarmup | None:
        """The background warm-up (None without one)."""
        return self._warm

    def pending_events(self, request_id: str) -> int:
        """Events already delivered to ``request_id``'s stream and not yet read (a hint: 0 once it ended).

        The HTTP layer uses it to write several tokens in one send when its consumer has fallen behind."""
        seq = self.sched.seqs.get(request_id)
        return seq.queue.qsize() if seq is not None else 0

    def timing(self, request_id: str) -> RequestTiming | None:
        return self.sched.pop_timing(request_id)

    async def wait_warm(self, timeout_s: float | None = None) -> bool:
        """Wait until the engine runs its fused, graphed path (at once without background warm-up)."""
        if self._warm is None:
            return True
        return await asyncio.get_running_loop().run_in_executor(None, self._warm.applied.wait, timeout_s)

    @property
    def graph_error(self) -> str | None:
        return self.runner.graph_error

    # ------------------------------------------------------------------ loop thread
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                if self._warm is None:
                    self.runner.prepare()
                else:
                    self._warm.on_done = self._wake
                    self._warm.start()
        except BaseException as exc:  # noqa: BLE001
            self._start_error = exc
            self._ready.set()
            return
        self._ready.set()
        sched = self.sched
        with torch.inference_mode():
            while True:
                with sched.cv:
                    while not (sched.has_work() or self._inflight or self._stopping or self._switch_due()):
                        if self._warm is not None:
                            self._warm.idle()     # nothing to serve: a deferred compile may start
                        sched.cv.wait(0.5)
                    if self._stopping:
                        break
                    cancels = sched.take_cancels()
                if self._switch_due() and self._warm.apply() and self.on_warm is not None:
                    self.on_warm()
                try:
                    out: Out = {}
                    self._step(cancels, out)
                    delivery.flush(out)
                except Exception as exc:  # noqa: BLE001 - fail the live requests, keep serving
                    log.exception("fast engine step failed")
                    self._inflight = None
                    out = {}
                    sched.fail_all(f"{type(exc).__name__}: {exc}", out)
                    delivery.flush(out)

    def _switch_due(self) -> bool:
        return self._warm is not None and self._warm.done.is_set() and not self._warm.applied.is_set()

    def _wake(self) -> None:
        with self.sched.cv:
            self.sched.cv.notify_all()

    def _step(self, cancels: list[str], out: Out) -> None:
        """One turn of the loop: cancellations, admission (launch the prefill), launch decode step k+1 (the
        prefilled rows included), then read step k's tokens and the prefill's first tokens. Nothing in the
        turn waits for the device before step k+1 is queued, so a prefill leaves no gap on the device."""
        sched, steps = self.sched, self.executor
        sched.apply_cancels(cancels, out)
        mx = self.runner.mixed
        batch, t_admit, mixed = sched.admit(mx.max_segments, mx.seg_tokens, self.mixed_min_segments)
        prefill = None
        if batch and not mixed:
            prefill = steps.prefill_launch(batch, t_admit)
            sched.prefill_started(batch)
            if not self.overlap_prefill:
                self._first_tokens(batch, prefill, out)
                prefill = None
        launched = None
        if sched.running:
            t0 = time.monotonic_ns()
            launched = steps.launch(sched.decode_rows(), t0, sched.n_sampling > 0, sched.n_filter > 0,
                                    batch if mixed else None)
            if mixed:
                sched.prefill_started(batch)
        done = self._inflight
        if done is not None:
            host = steps.collect(done)
            steps.decode_tokens += sched.decoded(done.rows, host, out)
            if done.chunk:
                first = host[done.batch:]
                sched.first_tokens(done.chunk, [[x[0] for x in first], [x[1] for x in first]],
                                   time.monotonic_ns(), out)
                if self._warm is not None:
                    self._warm.served()
        self._inflight = launched
        if prefill is not None:
            self._first_tokens(batch, prefill, out)

    def _first_tokens(self, batch: list[Seq], prefill: PrefillInFlight, out: Out) -> None:
        host, t_first = self.executor.prefill_collect(prefill)
        self.sched.first_tokens(batch, host, t_first, out)
        if self._warm is not None:
            self._warm.served()           # the background compile waits until these requests are done

