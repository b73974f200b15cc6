"""The ``transformers`` engine: transformers' own continuous batching behind the Engine interface.

One ``ContinuousBatchingManager`` (``model.init_continuous_batching()``) runs its generation loop on
a background thread. Each request is added with ``streaming=True``; outputs come back on the event
loop through ``register_result_handler`` (transformers >= 5.2x) or, on versions without it, through a
small dispatcher thread reading the manager's output queue. ``generated_tokens`` in streamed outputs
is cumulative: the engine turns it into one :class:`TokenEvent` per new token.

``do_sample`` is a manager-wide setting in transformers' batching, so greedy requests and sampled
requests go to two managers (the sampling one is created on first use, with per-request
temperature/top-p/top-k processors). Per-request seeds are not supported by this engine (the fast
engine has them); a request's ``seed`` is ignored here.

Owns the requests: submission, the per-request token events, cancellation, timings and stats. The
managers themselves (configuration, creation, restart, dispatcher threads) are
:mod:`model_server.engines.transformers_managers`'; this module must not configure or start one.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from model_server.engines.base import (Engine, EngineStats, GenerationRequest, RequestTiming,
                                       SamplingParams, TokenEvent)
from model_server.engines.transformers_managers import ManagerPool, supported_kwargs

log = logging.getLogger("model_server.engines.transformers")

_FINISHED = 3   # RequestStatus.FINISHED (FAILED is larger)


@dataclass
class _Active:
    request: GenerationRequest
    queue: asyncio.Queue
    manager_key: str
    seen: int = 0
    submit_ns: int = 0
    first_token_ns: int = 0
    done: bool = False
    batch_at_admission: int = 0
    queue_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class TransformersEngine(Engine):
    """Continuous batching through transformers' ContinuousBatchingManager."""

    name = "transformers"

    def __init__(self, loaded, max_batch: int = 32, max_total_tokens: int = 2048,
                 page_size: int | None = None) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.max_batch = max_batch
        self.max_total_tokens = max_total_tokens
        self.eos_ids = set(loaded.eos_token_ids)
        self.managers = ManagerPool(loaded, max_batch, max_total_tokens,
                                    page_size or (32 if loaded.device_type == "cpu" else 256), self._deliver)
        self._active: dict[str, _Active] = {}
        self._timings: dict[str, RequestTiming] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._stats_lock = threading.Lock()
        self._prefill_tokens = 0
        self._decode_tokens = 0
        self._steps = 0
        self._max_seen_batch = 0

    def _deliver(self, out) -> None:
        """A manager output read on a dispatcher thread: handled on the event loop."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_output, out)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.managers.get, "greedy")
        self._accepting = True

    async def warmup(self, prompt_ids: list[int], new_tokens: int = 2) -> None:
        """One short greedy request through the whole path (allocations, first-call kernels)."""
        it = self.submit(GenerationRequest("warmup", list(prompt_ids),
                                           SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)))
        async for _ev in it:
            pass
        self._timings.pop("warmup", None)

    async def stop(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        self._accepting = False
        if drain:
            deadline = time.monotonic() + timeout_s
            while self._active and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        for rid in list(self._active):
            self.cancel(rid)
        await self.managers.stop()

    # ------------------------------------------------------------------ requests
    def submit(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        key = "sample" if request.params.do_sample else "greedy"
        state = _Active(request=request, queue=queue, manager_key=key, submit_ns=time.monotonic_ns(),
                        batch_at_admission=len(self._active) + 1)
        if not self._accepting and request.request_id != "warmup":
            queue.put_nowait(TokenEvent(None, finish_reason="error", error="engine is not accepting requests"))
            return self._iterate(request.request_id, queue)
        if request.request_id in self._active:
            queue.put_nowait(TokenEvent(None, finish_reason="error", error="duplicate request id"))
            return self._iterate(request.request_id, queue)
        self._active[request.request_id] = state
        self._max_seen_batch = max(self._max_seen_batch, len(self._active))
        try:
            mgr = self.managers.get(key)
            p = request.params
            kwargs: dict[str, Any] = {"request_id": request.request_id,
                                      "max_new_tokens": p.max_new_tokens, "streaming": True}
            if p.ignore_eos:
                kwargs["eos_token_id"] = -1
            if p.do_sample:
                vocab = self.managers.vocab_size()
                kwargs.update(temperature=float(p.temperature), top_p=float(p.top_p),
                              top_k=min(int(p.top_k), vocab) if p.top_k > 0 else vocab)
            if hasattr(mgr, "register_result_handler"):
                mgr.register_result_handler(request.request_id, self._on_output)
            rid = mgr.add_request(list(request.prompt_ids), **supported_kwargs(mgr.add_request, kwargs))
            if rid is None:
                raise RuntimeError("the batching manager refused the request (stopping)")
        except Exception as exc:
            self._active.pop(request.request_id, None)
            queue.put_nowait(TokenEvent(None, finish_reason="error", error=f"{type(exc).__name__}: {exc}"))
        return self._iterate(request.request_id, queue)

    def _on_output(self, out) -> None:
        """Runs on the event loop for each (cumulative) output of a request."""
        state = self._active.get(out.request_id)
        if state is None or state.done:
            return
        now = time.monotonic_ns()
        tokens = list(out.generated_tokens or [])
        logprobs = list(getattr(out, "logprobs", None) or [])
        if state.queue_seconds is None:
            life = getattr(out, "lifespan", (-1, -1))
            created = getattr(out, "created_time", None)
            if life and life[0] and life[0] > 0 and created:
                state.queue_seconds = max(0.0, float(life[0]) - float(created))
        emitted = state.extra.setdefault("emitted", [])
        if tokens[:len(emitted)] == emitted:
            new = tokens[len(emitted):]          # cumulative outputs (transformers 5.2x)
        else:
            new = tokens                         # per-step outputs (guard for other versions)
        emitted.extend(new)
        status = int(getattr(out, "status", 0))
        finished = out.is_finished() if hasattr(out, "is_finished") else status >= _FINISHED
        error = getattr(out, "error", None)
        if new and state.first_token_ns == 0:
            state.first_token_ns = now
            with self._stats_lock:
                self._prefill_tokens += len(state.request.prompt_ids)
        for i, tok in enumerate(new):
            idx = state.seen + i
            lp_list = logprobs[idx:idx + 1] if len(logprobs) > idx else logprobs[i:i + 1]
            last = finished and i == len(new) - 1 and not error
            reason = None
            if last:
                reason = ("eos_token" if (tok in self.eos_ids and not state.request.params.ignore_eos)
                          else "length")
            lp = float(lp_list[0]) if lp_list else None
            state.queue.put_nowait(TokenEvent(int(tok), logprob=lp, finish_reason=reason))
        state.seen = len(emitted)
        with self._stats_lock:
            self._decode_tokens += len(new)
        if finished:
            if error or status > _FINISHED:
                state.queue.put_nowait(TokenEvent(None, finish_reason="error", error=str(error or "failed")))
            elif not new:
                reason = "eos_token" if tokens and tokens[-1] in self.eos_ids else "length"
                state.queue.put_nowait(TokenEvent(None, finish_reason=reason))
            self._finish(state, now)

    def _finish(self, state: _Active, now_ns: int) -> None:
        state.done = True
        rid = state.request.request_id
        self._active.pop(rid, None)
        first = state.first_token_ns or now_ns
        queue_s = state.queue_seconds or 0.0
        to_first = (first - (state.request.arrival_ns or state.submit_ns)) / 1e9
        self._timings[rid] = RequestTiming(
            queue_seconds=queue_s, prefill_seconds=max(0.0, to_first - queue_s),
            decode_seconds=max(0.0, (now_ns - first) / 1e9),
            batch_size_at_admission=state.batch_at_admission)
        if len(self._timings) > 10000:  # nobody reads them: don't grow without bound
            self._timings.pop(next(iter(self._timings)))

    async def _iterate(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[TokenEvent]:
        finished = False
        try:
            while True:
                ev: TokenEvent = await queue.get()
                yield ev
                if ev.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self.cancel(request_id)

    def cancel(self, request_id: str) -> None:
        state = self._active.get(request_id)
        if state is None or state.done:
            return
        mgr = self.managers.existing(state.manager_key)
        if mgr is not None:
            with mgr.output_router._lock if hasattr(mgr, "output_router") else _NullLock():
                if hasattr(mgr, "output_router"):
                    mgr.output_router.result_handlers.pop(request_id, None)
            try:
                mgr.cancel_request(request_id)
            except Exception as exc:
                log.warning("cancel_request failed: %s", exc)
        state.queue.put_nowait(TokenEvent(None, finish_reason="cancelled"))
        self._finish(state, time.monotonic_ns())

    # ------------------------------------------------------------------ stats
    def stats(self) -> EngineStats:
        active = list(self._active.values())
        running = sum(1 for a in active if a.first_token_ns)
        with self._stats_lock:
            return EngineStats(
                waiting_requests=len(active) - running, running_requests=running,
                max_batch_size=self.max_batch, steps_total=self._steps,
                prefill_tokens_total=self._prefill_tokens, decode_tokens_total=self._decode_tokens,
                extra={"max_concurrent_seen": float(self._max_seen_batch)})

    def timing(self, request_id: str) -> RequestTiming | None:
        return self._timings.pop(request_id, None)


class _NullLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
