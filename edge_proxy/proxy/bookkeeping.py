"""Per-request bookkeeping: the observer calls of each generation request, off its response's path.

Owns the calls described in ``edge_proxy.proxy.hooks`` (``on_request_start`` -> ``on_tokens`` ->
``on_request_end`` -> ``await finalize`` (background, bounded) -> ``on_request_final``: other
components first, then the core outputs: metrics, access log, span), the queue of ended requests,
and :meth:`Bookkeeping.drain`. An observer that raises is logged once and never breaks a request.
Must not: touch HTTP (requests, responses, the backend), or block the event loop.

An observer may offer finalize as a callback, ``finalize_soon(rec, done)`` (``done(rec)`` once, on
the loop, within its own bound): when it is the only finalize observer (the energy observer) it is
called instead of a task running ``await finalize(rec)`` under a timeout, which costs more than
the rest of the energy bookkeeping of a request.

End-of-request work (finalize, metrics, access log, economics) runs when the loop has been quiet
for :data:`FINAL_QUIET_SECONDS`, at most :data:`FINAL_MAX_DELAY_SECONDS` after a request ended, and
in slices of :data:`FINAL_SLICE` requests: requests that end together (one decode step of a batch)
and the clients' next requests that arrive right then are not delayed by it (docs/benchmarks.md).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from edge_proxy.telemetry.metrics import ProxyMetrics
from edge_proxy.proxy import json_input
from edge_proxy.proxy.hooks import BaseObserver, RequestObserver, RequestRecord
from edge_proxy.proxy.token_accounting import account_openai_body, account_tgi_body

log = logging.getLogger("edge_proxy")

FINALIZE_TIMEOUT_SECONDS = 5.0
FINAL_QUIET_SECONDS = 0.002
FINAL_MAX_DELAY_SECONDS = 0.05
FINAL_SLICE = 16


def _overrides(obs: object, name: str) -> bool:
    return getattr(type(obs), name, None) is not getattr(BaseObserver, name)


class Bookkeeping:
    """Dispatch of the observer calls. ``observers``: the components (energy, economics, ...;
    mutable until :meth:`freeze`); ``outputs``: the core outputs (metrics, access log, tracing)."""

    def __init__(self, metrics: ProxyMetrics, observers: list[RequestObserver],
                 outputs: list[RequestObserver]) -> None:
        self.metrics = metrics
        self.observers = observers
        self.outputs = outputs
        self.pending_finals: set[asyncio.Task[None]] = set()
        self._failed_observers: set[int] = set()
        # ended requests whose bookkeeping waits for a quiet loop (see FINAL_QUIET_SECONDS)
        # (record, finalized): finalized ones only wait for their on_request_final calls
        self._ended: list[tuple[RequestRecord, bool]] = []
        self._ended_first = 0.0
        self._ended_last = 0.0
        self._ended_timer: asyncio.Handle | None = None
        self._soon: dict[str, RequestRecord] = {}      # in finalize_soon, by request id
        self._soon_idle: asyncio.Future[None] | None = None   # drain waits for _soon to empty
        self.freeze()

    def freeze(self) -> None:
        """Sort the observers by the calls they implement (at construction and at start-up)."""
        obs = list(self.observers)
        self.start_obs = [o for o in obs if _overrides(o, "on_request_start")]
        self._token_obs = [o for o in obs if _overrides(o, "on_tokens")]
        # bound once (hot path): a stream's first token event calls every token observer, the
        # later ones only those that want every event (not ``first_token_only``, e.g. energy)
        self._first_token_calls = [o.on_tokens for o in self._token_obs]
        self._token_calls = [o.on_tokens for o in self._token_obs if not getattr(o, "first_token_only", False)]
        self._end_obs = [o for o in obs if _overrides(o, "on_request_end")]
        self._finalize_obs = [o for o in obs if _overrides(o, "finalize")]
        # the callback form of finalize (``finalize_soon(rec, done)``, the energy observer's), when
        # it is the only one: no task and no timeout scope per request (docs/benchmarks.md, issue 17)
        soon = getattr(self._finalize_obs[0], "finalize_soon", None) if len(self._finalize_obs) == 1 else None
        self._finalize_soon = soon if callable(soon) else None
        self._final_obs = [o for o in obs + list(self.outputs) if _overrides(o, "on_request_final")]
        self._output_final = [o for o in self.outputs if _overrides(o, "on_request_final")]
        # extra response headers computed from the request's state (energy: x-edge-energy-joules,
        # opt-in); an observer says whether it wants them now with ``wants_response_headers``
        self.header_calls = [o.response_headers for o in obs  # type: ignore[attr-defined]
                             if callable(getattr(o, "response_headers", None))
                             and getattr(o, "wants_response_headers", True)]

    # ---- calls (never raise into the proxy) ------------------------------------------------------
    def call(self, obs: object, name: str, *args: Any) -> None:
        try:
            getattr(obs, name)(*args)
        except Exception:  # noqa: BLE001 - an observer must never break a request
            self._log_failure(obs, name)

    def _log_failure(self, obs: object, name: str) -> None:
        if id(obs) not in self._failed_observers:
            self._failed_observers.add(id(obs))
            log.exception("observer %s.%s failed (logged once)", type(obs).__name__, name)

    def start(self, rec: RequestRecord) -> None:
        for o in self.start_obs:
            self.call(o, "on_request_start", rec)

    def tokens(self, rec: RequestRecord, n: int, t_ns: int) -> None:
        """``n`` output tokens reached the client at ``t_ns`` (a stream's events)."""
        calls = self._token_calls
        if rec.t_first_token_ns is None:
            rec.t_first_token_ns = t_ns
            calls = self._first_token_calls
        rec.t_last_token_ns = t_ns
        if n == 1:
            rec.token_times_ns.append(t_ns)
        else:
            rec.token_times_ns.extend([t_ns] * n)
        for f in calls:
            try:
                f(rec, n, t_ns)
            except Exception:  # noqa: BLE001 - an observer must never break a request
                self._log_failure(f.__self__, "on_tokens")

    def account_whole(self, rec: RequestRecord, data: bytes, t: int) -> None:
        """Token counts of a whole 200 response (from the body, else the backend's headers) and
        the token observers' call."""
        n_out: int | None = None
        try:
            obj = json_input.loads(data)
        except ValueError:
            obj = None
        if obj is not None:
            n_out = account_openai_body(rec, obj) if rec.api == "openai" else account_tgi_body(rec, obj)
        if n_out is None and "header_generated_tokens" in rec.extra:
            n_out = int(rec.extra["header_generated_tokens"])  # type: ignore[arg-type]
        if n_out is not None:
            rec.output_tokens = n_out
            rec.token_count_source = "backend"
            if n_out:
                for o in self._token_obs:
                    self.call(o, "on_tokens", rec, n_out, t)

    def account_whole_then_end(self, rec: RequestRecord, started: bool,
                               whole: tuple[bytes, int] | None) -> None:
        """After a whole response was written: its tokens, then the end of the request."""
        if whole is not None:
            self.account_whole(rec, *whole)
        self.end(rec, started)

    def end(self, rec: RequestRecord, started: bool, counted: bool = True) -> None:
        """The request ended. ``started``: its observers saw a start (else only the core outputs
        hear of it); ``counted``: it was counted in flight (its body was complete)."""
        if counted:
            self.metrics.in_flight.dec()
        if not started:
            for o in self._output_final:
                self.call(o, "on_request_final", rec)
            return
        for o in self._end_obs:          # O(1) each: they stamp the end (energy, economics)
            self.call(o, "on_request_end", rec)
        # the rest waits for a quiet loop (bounded delay)
        self._ended_last = time.monotonic()
        self._queue_final(rec, False)

    # ---- the queue of ended requests -------------------------------------------------------------
    def _queue_final(self, rec: RequestRecord, finalized: bool) -> None:
        if not self._ended:
            self._ended_first = time.monotonic()
        self._ended.append((rec, finalized))
        if self._ended_timer is None:
            self._ended_timer = asyncio.get_running_loop().call_later(FINAL_QUIET_SECONDS,
                                                                      self._ended_due)

    def _ended_due(self) -> None:
        # time.monotonic(), not loop.time(): uvloop's loop time is cached at 1 ms resolution.
        # One check per FINAL_QUIET_SECONDS at most while requests keep ending.
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        if now - self._ended_last < FINAL_QUIET_SECONDS and now - self._ended_first < FINAL_MAX_DELAY_SECONDS:
            self._ended_timer = loop.call_later(FINAL_QUIET_SECONDS, self._ended_due)
            return
        self._run_ended_slices()

    def _run_ended_slices(self) -> None:
        """One slice now, the rest in later loop turns (I/O that arrived meanwhile goes between)."""
        self._run_ended()
        self._ended_timer = (asyncio.get_running_loop().call_soon(self._run_ended_slices)
                             if self._ended else None)

    def _run_ended(self) -> None:
        batch, self._ended = self._ended[:FINAL_SLICE], self._ended[FINAL_SLICE:]
        for rec, finalized in batch:
            if self._finalize_obs and not finalized and self._finalize_soon is not None:
                self._soon[rec.request_id] = rec
                try:
                    self._finalize_soon(rec, self._soon_done)
                except Exception:  # noqa: BLE001
                    self._log_failure(self._finalize_obs[0], "finalize")
                    self._soon_done(rec)
            elif self._finalize_obs and not finalized:
                task = asyncio.get_running_loop().create_task(self._finalize(rec))
                self.pending_finals.add(task)
                task.add_done_callback(self.pending_finals.discard)
            else:
                self._final(rec)

    async def _finalize(self, rec: RequestRecord) -> None:
        """Wait (bounded) for the finalize observers (energy: the request's ticks), then queue the
        request's final calls for a quiet loop like its end: requests finalized by the same tick
        do not all run their metrics, access log and economics in one loop turn."""
        async def one(o: Any) -> None:
            try:
                await o.finalize(rec)
            except Exception:  # noqa: BLE001
                self._log_failure(o, "finalize")
        try:
            async with asyncio.timeout(FINALIZE_TIMEOUT_SECONDS):
                if len(self._finalize_obs) == 1:
                    await one(self._finalize_obs[0])
                else:
                    await asyncio.gather(*(one(o) for o in self._finalize_obs))
        except TimeoutError:
            log.warning("finalize of request %s did not finish in time", rec.request_id)
        except asyncio.CancelledError:      # shutting down: its final calls now, with what is known
            self._final(rec)
            return
        self._queue_final(rec, True)

    def _soon_done(self, rec: RequestRecord) -> None:
        """``finalize_soon``'s callback (once per request; a late second call is ignored)."""
        if self._soon.pop(rec.request_id, None) is None:
            return
        self._queue_final(rec, True)
        if not self._soon and self._soon_idle is not None and not self._soon_idle.done():
            self._soon_idle.set_result(None)

    def _final(self, rec: RequestRecord) -> None:
        for o in self._final_obs:
            self.call(o, "on_request_final", rec)

    async def drain(self, timeout: float = FINALIZE_TIMEOUT_SECONDS + 1.0) -> None:
        """Run the queued end-of-request work now and wait for pending finalize/final tasks
        (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while True:
            if self._ended_timer is not None:
                self._ended_timer.cancel()
                self._ended_timer = None
            while self._ended:
                self._run_ended()
            left = deadline - time.monotonic()
            if (not self.pending_finals and not self._soon) or left <= 0:
                for rec in list(self._soon.values()):    # given up: final calls with what is known
                    del self._soon[rec.request_id]
                    self._final(rec)
                return
            # finalize tasks and callbacks queue their records' final calls when they finish: run
            # those too
            waits: list[asyncio.Future[Any]] = list(self.pending_finals)
            if self._soon:
                if self._soon_idle is None or self._soon_idle.done():
                    self._soon_idle = asyncio.get_running_loop().create_future()
                waits.append(self._soon_idle)
            await asyncio.wait(waits, timeout=left)
