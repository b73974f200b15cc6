"""``FastEngine``: continuous batching over a fixed-slot KV cache, decode via CUDA graphs.

Construction (``model-server serve --engine fast`` calls ``from_loaded(loaded, max_batch, max_total_tokens)``,
which wraps this)::

    FastEngine(model, eos_token_ids, max_batch=64, max_seq_len=2048, device=None, dtype=None,
               use_cuda_graphs=None, max_prefill_tokens=8192)

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
* ``start()`` does the device work of warm-up (compile, one graph per batch bucket x length bucket); all
  later device work happens on the engine's own thread.
* ``lazy_graphs`` (``MODEL_SERVER_FAST_LAZY_GRAPHS=1`` through ``from_loaded``): ``start()`` captures no
  graph; a bucket's first step runs eagerly and records its graph for later steps (a one-off stall
  of one capture, tens of ms), so a cold start reaches its first token without capturing ~50 graphs.

Loop: one background thread owns every device operation. Between decode steps it applies
cancellations (``cancel()`` is immediate for a queued request; a running one's slot is freed at the next
step boundary, i.e. within one decode step, and is free for the very next admission), admits waiting
requests into free slots (lowest slot first; batched, right-padded prefill within ``max_prefill_tokens``, and within
``step_prefill_tokens`` while other sequences are decoding, so an arrival stalls them by a bounded
amount; short prefills replay a CUDA graph per prefill bucket, see ``runner``),
then launches one decode step for all live slots: graph replay, sampling on the device, ONE
device-to-host copy of (token, logprob) per row. The step is launched *before* the previous step's tokens
are read (inputs stay on the device), so host bookkeeping overlaps the device; a sequence that hits EOS
has one extra step computed and dropped. Tokens go to the consumers with one
``loop.call_soon_threadsafe`` per asyncio loop per step.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from ..base import (Engine, EngineStats, FinishReason, GenerationRequest, RequestTiming,
                    TokenEvent)
from .runner import ModelRunner, UnsupportedModel  # noqa: F401 - re-exported
from .sampling import SlotSampling, select_tokens

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Seq:
    req: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival_ns: int
    max_new: int
    length_capped: bool = False
    slot: int = -1
    prompt_len: int = 0
    generated: int = 0
    pos: int = 0                     # where the next input token's K/V is written
    launched: int = 0                # tokens produced or in flight (prefill's counts)
    done: bool = False               # consumer side: final event sent / cancel requested
    t_admit_ns: int = 0
    t_first_ns: int = 0
    batch_at_admission: int = 0
    timing_extra: dict = field(default_factory=dict)


class FastEngine(Engine):
    name = "fast"
    supports_seed = True      # per-request seeded sampling (sampling.seeded_uniform)

    def __init__(self, model: torch.nn.Module, eos_token_ids: list[int] | tuple[int, ...] | int | None,
                 max_batch: int = 64, max_seq_len: int = 2048, device: str | torch.device | None = None,
                 dtype: torch.dtype | str | None = None, *, use_cuda_graphs: bool | None = None,
                 max_prefill_tokens: int = 8192, batch_buckets: list[int] | None = None,
                 length_buckets: list[int] | None = None, fuse: bool | None = None,
                 step_prefill_tokens: int = 2048, prefill_graph_tokens: int | None = None,
                 bucketed_prefill: bool | None = None, lazy_graphs: bool = False) -> None:
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        quantized = bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_quantized", False)
                         or getattr(model, "is_int4_weight_only", False))
        if dtype is None and not quantized:
            dtype = _default_dtype(next(model.parameters()), device)
        if device is not None:
            device = torch.device(device)
            if not quantized and next(model.parameters()).device != device:
                model = model.to(device)
        if dtype is not None and not quantized and next(model.parameters()).dtype != dtype:
            model = model.to(dtype)
        model.eval()
        if eos_token_ids is None:
            eos: set[int] = set()
        elif isinstance(eos_token_ids, int):
            eos = {eos_token_ids}
        else:
            eos = {int(x) for x in eos_token_ids}
        self.eos_ids = eos
        self.max_batch = int(max_batch)
        self.max_seq_len = int(max_seq_len)
        self.max_prefill_tokens = max(int(max_prefill_tokens), self.max_seq_len)
        # padded prefill tokens admitted between two decode steps while sequences are decoding (at
        # least one request is always admitted): bounds the stall an arrival adds to everyone's ITL
        self.step_prefill_tokens = max(1, int(step_prefill_tokens))
        self.runner = ModelRunner(model, self.max_batch, self.max_seq_len, use_cuda_graphs,
                                  batch_buckets, length_buckets, fuse, prefill_graph_tokens,
                                  bucketed_prefill, lazy_graphs)
        self.device = self.runner.device
        self.sampling = SlotSampling.allocate(self.max_batch, self.device)
        pin = self.device.type == "cuda"
        # double-buffered pinned staging (step k uses buffer k % 2): positions up, (token, logprob) down
        self._pos_stage = [torch.zeros(self.max_batch, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._out_stage = [torch.zeros(self.max_batch, 2, dtype=torch.float64, pin_memory=pin) for _ in range(2)]
        self._inflight: tuple | None = None   # (buffer index, event or None, b, [(seq, slot)])
        self._step_parity = 0
        self._plen_dev = torch.zeros(self.max_batch, dtype=torch.int64, device=self.device)
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._pending: deque[_Seq] = deque()
        self._cancels: list[str] = []
        self._seqs: dict[str, _Seq] = {}          # every known, unfinished request
        self._slots: list[_Seq | None] = [None] * self.max_batch
        self._n_sampling = 0
        self._n_filter = 0
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._stopping = False
        self._accepting = False
        self._timings: dict[str, RequestTiming] = {}
        # counters (written by the loop thread only; int reads are atomic)
        self._steps = 0
        self._prefill_tokens = 0
        self._decode_tokens = 0
        self._running = 0
        self._decode_seconds = 0.0
        self._prefill_seconds = 0.0

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
            while time.monotonic() < deadline:
                with self._lock:
                    busy = bool(self._seqs)
                if not busy:
                    break
                await asyncio.sleep(0.01)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30.0)
            self._thread = None
        # anything left: tell its consumer
        with self._lock:
            left = list(self._seqs.values())
            self._seqs.clear()
            self._pending.clear()
        for s in left:
            self._send(s, [TokenEvent(None, finish_reason="cancelled")])

    def submit(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        arrival = request.arrival_ns or time.monotonic_ns()
        n_prompt = len(request.prompt_ids)
        seq = _Seq(req=request, loop=loop, queue=queue, arrival_ns=arrival,
                   max_new=int(request.params.max_new_tokens))
        error = None
        if not self._accepting:
            error = "engine is not running"
        elif n_prompt == 0:
            error = "empty prompt"
        elif n_prompt >= self.max_seq_len:
            error = f"prompt has {n_prompt} tokens; this engine holds at most {self.max_seq_len - 1}"
        elif seq.max_new < 1:
            error = "max_new_tokens must be at least 1"
        if error is not None:
            queue.put_nowait(TokenEvent(None, finish_reason="error", error=error))
            seq.done = True
            return self._stream(seq)
        room = self.max_seq_len - n_prompt
        if seq.max_new > room:
            seq.max_new = room
            seq.length_capped = True
        with self._cv:
            if request.request_id in self._seqs:
                queue.put_nowait(TokenEvent(None, finish_reason="error",
                                            error=f"duplicate request id {request.request_id}"))
                seq.done = True
                return self._stream(seq)
            self._seqs[request.request_id] = seq
            self._pending.append(seq)
            self._cv.notify()
        return self._stream(seq)

    def cancel(self, request_id: str) -> None:
        final = None
        with self._cv:
            seq = self._seqs.get(request_id)
            if seq is None or seq.done:
                return
            seq.done = True
            queued = False
            if seq.slot < 0:
                try:
                    self._pending.remove(seq)
                    queued = True
                except ValueError:       # the loop thread is admitting it right now
                    pass
            if queued:
                del self._seqs[request_id]
                final = seq
            else:
                self._cancels.append(request_id)
                self._cv.notify()
        if final is not None:
            self._send(final, [TokenEvent(None, finish_reason="cancelled")])

    def stats(self) -> EngineStats:
        r = self.runner
        return EngineStats(
            waiting_requests=len(self._pending),
            running_requests=self._running,
            max_batch_size=self.max_batch,
            steps_total=self._steps,
            prefill_tokens_total=self._prefill_tokens,
            decode_tokens_total=self._decode_tokens,
            extra={
                "cuda_graphs": float(bool(r.graphs)),
                "cuda_graphs_captured": float(len(r.graphs)),
                "prefill_graphs_captured": float(len(r.prefill_graphs)),
                "prefill_calls_bucketed": float(r.prefill_calls["bucketed"]),
                "prefill_calls_eager": float(r.prefill_calls["eager"]),
                "fused_ops": float(r.ops.fused),
                "graph_capture_seconds": r.capture_seconds,
                "kv_cache_bytes": float(r.cache.nbytes),
                "free_slots": float(r.cache.n_free),
                "decode_seconds_total": self._decode_seconds,
                "prefill_seconds_total": self._prefill_seconds,
            },
        )

    def pending_events(self, request_id: str) -> int:
        """Events already delivered to ``request_id``'s stream and not yet read (a hint: 0 once it ended).

        The HTTP layer uses it to write several tokens in one send when its consumer has fallen behind."""
        seq = self._seqs.get(request_id)
        return seq.queue.qsize() if seq is not None else 0

    def timing(self, request_id: str) -> RequestTiming | None:
        with self._lock:
            return self._timings.pop(request_id, None)

    @property
    def graph_error(self) -> str | None:
        return self.runner.graph_error

    # ------------------------------------------------------------------ consumer side
    async def _stream(self, seq: _Seq) -> AsyncIterator[TokenEvent]:
        finished = False
        try:
            while True:
                ev = await seq.queue.get()
                if ev.finish_reason is not None:
                    finished = True
                yield ev
                if finished:
                    return
        finally:
            if not finished:
                self.cancel(seq.req.request_id)

    @staticmethod
    def _deliver(items: list[tuple[asyncio.Queue, list[TokenEvent]]]) -> None:
        for q, evs in items:
            for ev in evs:
                q.put_nowait(ev)

    def _send(self, seq: _Seq, events: list[TokenEvent]) -> None:
        try:
            seq.loop.call_soon_threadsafe(self._deliver, [(seq.queue, events)])
        except RuntimeError:  # loop closed: consumer is gone
            pass

    def _flush(self, out: dict[asyncio.AbstractEventLoop, list]) -> None:
        for loop, items in out.items():
            try:
                loop.call_soon_threadsafe(self._deliver, items)
            except RuntimeError:
                pass

    # ------------------------------------------------------------------ loop thread
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self.runner.prepare()
        except BaseException as exc:  # noqa: BLE001
            self._start_error = exc
            self._ready.set()
            return
        self._ready.set()
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._pending or self._cancels or self._running or self._inflight
                               or self._stopping):
                        self._cv.wait(0.5)
                    if self._stopping:
                        break
                    cancels, self._cancels = self._cancels, []
                try:
                    out: dict = {}
                    self._apply_cancels(cancels, out)
                    self._admit(out)
                    launched = self._launch_step() if self._running else None
                    if self._inflight is not None:
                        self._collect_step(self._inflight, out)
                    self._inflight = launched
                    self._flush(out)
                except Exception as exc:  # noqa: BLE001 - fail the live requests, keep serving
                    log.exception("fast engine step failed")
                    self._inflight = None
                    self._fail_all(f"{type(exc).__name__}: {exc}")

    def _release(self, seq: _Seq) -> None:
        """Free the slot (loop thread only)."""
        if seq.slot >= 0:
            self._slots[seq.slot] = None
            self.runner.cache.give_back(seq.slot)
            if seq.req.params.do_sample:
                self._n_sampling -= 1
                if seq.req.params.top_k > 0 or seq.req.params.top_p < 1.0:
                    self._n_filter -= 1
            seq.slot = -1
            self._running -= 1

    def _finish(self, seq: _Seq, reason: FinishReason) -> None:
        now = time.monotonic_ns()
        self._release(seq)
        with self._lock:
            self._seqs.pop(seq.req.request_id, None)
            first = seq.t_first_ns or now
            self._timings[seq.req.request_id] = RequestTiming(
                queue_seconds=(seq.t_admit_ns - seq.arrival_ns) / 1e9 if seq.t_admit_ns else 0.0,
                prefill_seconds=(first - seq.t_admit_ns) / 1e9 if seq.t_admit_ns else 0.0,
                decode_seconds=(now - first) / 1e9,
                batch_size_at_admission=seq.batch_at_admission,
            )
            if len(self._timings) > 10000:       # never grow without bound if nobody reads them
                self._timings.pop(next(iter(self._timings)))

    def _apply_cancels(self, ids: list[str], out: dict) -> None:
        for rid in ids:
            with self._lock:
                seq = self._seqs.get(rid)
            if seq is None or seq.slot < 0:
                continue
            self._finish(seq, "cancelled")
            out.setdefault(seq.loop, []).append((seq.queue, [TokenEvent(None, finish_reason="cancelled")]))

    def _fail_all(self, msg: str) -> None:
        out: dict = {}
        for seq in [s for s in self._slots if s is not None]:
            self._finish(seq, "error")
            out.setdefault(seq.loop, []).append((seq.queue, [TokenEvent(None, finish_reason="error", error=msg)]))
        self._flush(out)

    def _admit(self, out: dict) -> None:
        cache = self.runner.cache
        batch: list[_Seq] = []
        budget = self.step_prefill_tokens if self._running else self.max_prefill_tokens
        with self._lock:
            longest = 0
            while self._pending and cache.n_free > len(batch):
                nxt = self._pending[0]
                n = len(nxt.req.prompt_ids)
                if batch and max(longest, n) * (len(batch) + 1) > budget:
                    break
                self._pending.popleft()
                longest = max(longest, n)
                batch.append(nxt)
        if not batch:
            return
        t0 = time.monotonic_ns()
        slots = []
        for seq in batch:
            seq.slot = cache.take()
            seq.prompt_len = len(seq.req.prompt_ids)
            seq.t_admit_ns = t0
            self._slots[seq.slot] = seq
            slots.append(seq.slot)
            p = seq.req.params
            if p.do_sample:
                self._n_sampling += 1
                if p.top_k > 0 or p.top_p < 1.0:
                    self._n_filter += 1
        self._running += len(batch)
        for seq in batch:
            seq.batch_at_admission = self._running
        params = [s.req.params for s in batch]
        self.sampling.set_rows(
            slots, [p.do_sample for p in params], [float(p.temperature) for p in params],
            [int(p.top_k) for p in params], [float(p.top_p) for p in params],
            [p.seed if p.seed is not None else random.getrandbits(62) for p in params])
        slot_idx = torch.tensor(slots, dtype=torch.int64, device=self.device)
        self._plen_dev[slot_idx] = torch.tensor([s.prompt_len for s in batch], dtype=torch.int64,
                                                device=self.device)
        logits = self.runner.prefill(slots, [list(s.req.prompt_ids) for s in batch])
        any_s = any(p.do_sample for p in params)
        any_f = any(p.do_sample and (p.top_k > 0 or p.top_p < 1.0) for p in params)
        tok, lp = select_tokens(logits, slot_idx, self.sampling, torch.zeros_like(slot_idx), any_s, any_f)
        self.runner.in_ids[slot_idx] = tok
        host = torch.stack([tok.to(torch.float64), lp.to(torch.float64)]).cpu().tolist()
        t1 = time.monotonic_ns()
        self._prefill_seconds += (t1 - t0) / 1e9
        self._prefill_tokens += sum(s.prompt_len for s in batch)
        for i, seq in enumerate(batch):
            seq.t_first_ns = t1
            seq.pos = seq.prompt_len
            seq.launched = 1
            self._emit(seq, int(host[0][i]), float(host[1][i]), out)

    def _emit(self, seq: _Seq, token: int, logprob: float, out: dict) -> None:
        """Record one generated token for ``seq``; finish it on EOS / length (loop thread only)."""
        seq.generated += 1
        reason: FinishReason | None = None
        if token in self.eos_ids and not seq.req.params.ignore_eos:
            reason = "eos_token"
        elif seq.generated >= seq.max_new:
            reason = "length"
        if seq.done:          # cancel requested meanwhile: drop the token, _apply_cancels frees it
            return
        out.setdefault(seq.loop, []).append((seq.queue, [TokenEvent(token, logprob, finish_reason=reason)]))
        if reason is not None:
            seq.done = True
            self._finish(seq, reason)

    def _launch_step(self) -> tuple | None:
        """Enqueue one decode step for every live row that still needs a token; do not wait for it.

        The step's inputs are already on the device (``in_ids`` holds each row's last token, written by
        the previous step's sampling or by prefill), so the next step is launched before this one's
        tokens reach the host: the host-side bookkeeping of step k overlaps the device's step k+1. A
        row that finishes (EOS) at step k has already been given step k+1; that extra token is dropped.
        """
        t0 = time.monotonic_ns()
        rows = []
        for seq in self._slots:
            if seq is None or seq.done or seq.launched >= seq.max_new:
                continue
            rows.append((seq, seq.slot))
        if not rows:
            return None
        b_needed = max(slot for _, slot in rows) + 1
        len_needed = max(seq.pos for seq, _ in rows) + 1
        k = self._step_parity
        self._step_parity ^= 1
        stage = self._pos_stage[k]
        stage[:b_needed].zero_()
        for seq, slot in rows:
            stage[slot] = seq.pos
            seq.pos += 1
            seq.launched += 1
        r = self.runner
        r.in_pos[:b_needed].copy_(stage[:b_needed], non_blocking=True)
        if b_needed < r.max_batch:
            r.in_pos[b_needed:].zero_()
        logits = r.decode(b_needed, len_needed)
        b = logits.shape[0]
        counter = r.in_pos[:b] - self._plen_dev[:b] + 1
        tok, lp = select_tokens(logits, slice(0, b), self.sampling, counter,
                                self._n_sampling > 0, self._n_filter > 0)
        r.in_ids[:b].copy_(tok)
        out = self._out_stage[k]
        out[:b].copy_(torch.stack([tok.to(torch.float64), lp.to(torch.float64)], dim=1), non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self._steps += 1
        self._decode_seconds += (time.monotonic_ns() - t0) / 1e9
        return (k, event, b, rows)

    def _collect_step(self, inflight: tuple, out: dict) -> None:
        """Wait for a launched step (the one device-to-host sync per step) and emit its tokens."""
        k, event, b, rows = inflight
        if event is not None:
            event.synchronize()
        host = self._out_stage[k][:b].tolist()
        n = 0
        for seq, slot in rows:
            if seq.slot != slot or seq.done:    # finished, cancelled or slot reused meanwhile
                continue
            n += 1
            self._emit(seq, int(host[slot][0]), host[slot][1], out)
        self._decode_tokens += n


def _default_dtype(param: torch.Tensor, device: torch.device | str | None) -> torch.dtype | None:
    """The model's own dtype, except bf16 on a CUDA card below compute capability 8.0 (T4: no bf16): fp16."""
    dev = torch.device(device) if device is not None else param.device
    if param.dtype != torch.bfloat16 or dev.type != "cuda":
        return None
    from model_server.int4 import device_compute

    return device_compute(dev).dtype


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
    # cold start: MODEL_SERVER_FAST_LAZY_GRAPHS=1 captures each graph on its bucket's first use
    if os.environ.get("MODEL_SERVER_FAST_LAZY_GRAPHS", "").strip() == "1":
        kwargs.setdefault("lazy_graphs", True)
    return FastEngine(loaded.model, list(loaded.eos_token_ids), max_batch=max_batch, max_seq_len=max_len,
                      **kwargs)
