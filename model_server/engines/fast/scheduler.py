"""The fast engine's scheduling: admission, the waiting queue, slots, and which rows each step runs.

Owns every request's bookkeeping (:class:`Seq`): the checks at submission, the FIFO of waiting
requests, cancellation (immediate for a waiting request; a running one is freed at the next step
boundary), the composition of a prefill batch (FIFO into the lowest free KV slots, within a budget
of padded prompt tokens: ``max_prefill_tokens`` when nothing decodes, ``step_prefill_tokens`` while
others do, so an arrival stalls them by a bounded amount; one request is always admitted) or of
prompt segments riding in the next decode step (:mod:`.mixed`), the rows of a decode step, a
sequence's finish (EOS / length / cancel / error) and its timing.

Threading: methods documented "any thread" take :attr:`Scheduler.lock`; every other method runs on
the engine's loop thread only. Events for consumers are appended to an ``out`` map (event loop ->
[(queue, events)]) that the engine flushes once per step.

It must not touch the model or the device (:mod:`.step` runs steps) nor deliver events itself.
"""
from __future__ import annotations

import threading
import time
from collections import deque

from ..base import FinishReason, RequestTiming, TokenEvent
from .kv_cache import StaticKVCache
from .mixed import segments_needed
from .sampling import needs_filter
from .seq import Out, Row, Seq

__all__ = ["Out", "Row", "Scheduler", "Seq"]

MAX_UNREAD_TIMINGS = 10000      # timings nobody collects are dropped oldest first beyond this
MIXED_MAX_WAIT_NS = 10_000_000  # longest an arrival waits for fuller prompt segments (10 ms)


class Scheduler:
    """Waiting queue, KV slots and the per-request state of one fast engine."""

    def __init__(self, cache: StaticKVCache, max_batch: int, max_seq_len: int, max_prefill_tokens: int,
                 step_prefill_tokens: int, eos_ids: set[int]) -> None:
        self.cache = cache
        self.max_seq_len = max_seq_len
        self.max_prefill_tokens = max_prefill_tokens
        self.step_prefill_tokens = step_prefill_tokens
        self.eos_ids = eos_ids
        self.lock = threading.Lock()
        self.cv = threading.Condition(self.lock)
        self.pending: deque[Seq] = deque()
        self.cancels: list[str] = []
        self.seqs: dict[str, Seq] = {}          # every known, unfinished request
        self.slots: list[Seq | None] = [None] * max_batch
        self.timings: dict[str, RequestTiming] = {}
        # written by the loop thread only (int reads are atomic)
        self.running = 0
        self.n_sampling = 0                     # running rows that sample
        self.n_filter = 0                       # ... with top-k / top-p

    # ------------------------------------------------------------------ any thread
    def refusal(self, seq: Seq, accepting: bool) -> str | None:
        """Why ``seq`` cannot run (one line), or None; caps its ``max_new`` to what its slot holds."""
        n_prompt = len(seq.req.prompt_ids)
        if not accepting:
            return "engine is not running"
        if n_prompt == 0:
            return "empty prompt"
        if n_prompt >= self.max_seq_len:
            return f"prompt has {n_prompt} tokens; this engine holds at most {self.max_seq_len - 1}"
        if seq.max_new < 1:
            return "max_new_tokens must be at least 1"
        seq.max_new = min(seq.max_new, self.max_seq_len - n_prompt)
        return None

    def enqueue(self, seq: Seq) -> str | None:
        """Queue ``seq`` and wake the loop (any thread); an error line if its id is already known."""
        rid = seq.req.request_id
        with self.cv:
            if rid in self.seqs:
                return f"duplicate request id {rid}"
            self.seqs[rid] = seq
            self.pending.append(seq)
            self.cv.notify()
        return None

    def cancel(self, request_id: str) -> Seq | None:
        """Cancel a request (any thread). A waiting one is dropped now and returned (the caller tells
        its consumer); a running one is freed by the loop at the next step boundary."""
        with self.cv:
            seq = self.seqs.get(request_id)
            if seq is None or seq.done:
                return None
            seq.done = True
            if seq.slot < 0:
                try:
                    self.pending.remove(seq)
                except ValueError:       # the loop thread is admitting it right now
                    pass
                else:
                    del self.seqs[request_id]
                    return seq
            self.cancels.append(request_id)
            self.cv.notify()
        return None

    def busy(self) -> bool:
        with self.lock:
            return bool(self.seqs)

    def drop_all(self) -> list[Seq]:
        """Forget every request (after the loop stopped); returns them so their consumers can be told."""
        with self.lock:
            left = list(self.seqs.values())
            self.seqs.clear()
            self.pending.clear()
        return left

    def pop_timing(self, request_id: str) -> RequestTiming | None:
        with self.lock:
            return self.timings.pop(request_id, None)

    # ------------------------------------------------------------------ loop thread
    def has_work(self) -> bool:
        """Anything for the loop to do (caller holds the lock)."""
        return bool(self.pending or self.cancels or self.running)

    def take_cancels(self) -> list[str]:
        """The cancellations requested since the last call (caller holds the lock)."""
        cancels, self.cancels = self.cancels, []
        return cancels

    def release(self, seq: Seq) -> None:
        """Free the slot."""
        if seq.slot >= 0:
            self.slots[seq.slot] = None
            self.cache.give_back(seq.slot)
            if seq.req.params.do_sample:
                self.n_sampling -= 1
                if needs_filter(seq.req.params):
                    self.n_filter -= 1
            seq.slot = -1
            self.running -= 1

    def finish(self, seq: Seq, reason: FinishReason) -> None:
        now = time.monotonic_ns()
        self.release(seq)
        with self.lock:
            self.seqs.pop(seq.req.request_id, None)
            first = seq.t_first_ns or now
            self.timings[seq.req.request_id] = RequestTiming(
                queue_seconds=(seq.t_admit_ns - seq.arrival_ns) / 1e9 if seq.t_admit_ns else 0.0,
                prefill_seconds=(first - seq.t_admit_ns) / 1e9 if seq.t_admit_ns else 0.0,
                decode_seconds=(now - first) / 1e9,
                batch_size_at_admission=seq.batch_at_admission,
            )
            if len(self.timings) > MAX_UNREAD_TIMINGS:       # never grow without bound if nobody reads them
                self.timings.pop(next(iter(self.timings)))

    def apply_cancels(self, ids: list[str], out: Out) -> None:
        for rid in ids:
            with self.lock:
                seq = self.seqs.get(rid)
            if seq is None or seq.slot < 0:
                continue
            self.finish(seq, "cancelled")
            out.setdefault(seq.loop, []).append((seq.queue, [TokenEvent(None, finish_reason="cancelled")]))

    def fail_all(self, msg: str, out: Out) -> None:
        """Finish every running sequence with an ``error`` event (a step failed)."""
        for seq in [s for s in self.slots if s is not None]:
            self.finish(seq, "error")
            out.setdefault(seq.loop, []).append((seq.queue, [TokenEvent(None, finish_reason="error", error=msg)]))

    def admit(self, mixed_segments: int = 0, seg_tokens: int = 0, min_segments: int = 1,
              max_wait_ns: int = MIXED_MAX_WAIT_NS) -> tuple[list[Seq], int, bool]:
        """Move waiting requests into free slots: ``(batch, admission time ns, mixed)``.

        ``mixed``: the batch rides in the next decode step as prompt segments (:mod:`.mixed`). That is
        chosen while others decode, ``mixed_segments > 0``, and the waiting prompts that have a free slot
        need at most ``2 x mixed_segments`` segments of ``seg_tokens`` (a larger backlog is cheaper as
        one prefill pass); it takes FIFO up to ``mixed_segments`` segments, once they need ``min_segments``
        or the oldest has waited ``max_wait_ns`` (fuller segments cost less per prompt). Otherwise the batch is a
        prefill pass: FIFO, while a slot is free and ``longest prompt x rows`` stays within the budget."""
        cache = self.cache
        batch: list[Seq] = []
        with self.lock:
            mixed = bool(self.running and mixed_segments > 0 and seg_tokens > 0 and self.pending)
            if mixed:
                need = [segments_needed(len(q.req.prompt_ids), seg_tokens)
                        for q, _ in zip(self.pending, range(min(cache.n_free, 2 * mixed_segments + 1)))]
                mixed = bool(need) and need[0] <= mixed_segments and sum(need) <= 2 * mixed_segments
                if mixed and sum(need) < min(min_segments, mixed_segments) and \
                        time.monotonic_ns() - self.pending[0].arrival_ns < max_wait_ns:
                    return batch, 0, False          # wait for a fuller step (the decode goes on)
            if mixed:
                used = 0
                while self.pending and cache.n_free > len(batch):
                    n = segments_needed(len(self.pending[0].req.prompt_ids), seg_tokens)
                    if used + n > mixed_segments:
                        break
                    used += n
                    batch.append(self.pending.popleft())
            else:
                budget = self.step_prefill_tokens if self.running else self.max_prefill_tokens
                longest = 0
                while self.pending and cache.n_free > len(batch):
                    nxt = self.pending[0]
                    n = len(nxt.req.prompt_ids)
                    if batch and max(longest, n) * (len(batch) + 1) > budget:
                        break
                    self.pending.popleft()
                    longest = max(longest, n)
                    batch.append(nxt)
        if not batch:
            return batch, 0, False
        t0 = time.monotonic_ns()
        for seq in batch:
            seq.slot = cache.take()
            seq.prompt_len = len(seq.req.prompt_ids)
            seq.t_admit_ns = t0
            seq.prefilling = mixed
            self.slots[seq.slot] = seq
            p = seq.req.params
            if p.do_sample:
                self.n_sampling += 1
                if needs_filter(p):
                    self.n_filter += 1
        self.running += len(batch)
        for seq in batch:
            seq.batch_at_admission = self.running
        return batch, t0, mixed

    def prefill_started(self, batch: list[Seq]) -> None:
        """The admitted ``batch``'s prefill (a pass, or prompt segments of a decode step) is launched: each sequence's first token is in flight, so the
        next decode step already includes it (its K/V position is the prompt's length)."""
        for seq in batch:
            seq.pos = seq.prompt_len
            seq.launched = 1
            seq.prefilling = False

    def first_tokens(self, batch: list[Seq], host: list[list[float]], t_ns: int, out: Out) -> None:
        """Record each admitted sequence's first token (``host``: [tokens, logprobs] by row), read at ``t_ns``.
        One that finishes here (EOS, one token asked for) was given the decode step launched meanwhile:
        :meth:`decoded` drops that row."""
        for i, seq in enumerate(batch):
            seq.t_first_ns = t_ns
            self.emit(seq, int(host[0][i]), float(host[1][i]), out)

    def emit(self, seq: Seq, token: int, logprob: float, out: Out) -> None:
        """Record one generated token for ``seq``; finish it on EOS / length."""
        seq.generated += 1
        reason = self._reason(seq, token)
        if seq.done:          # cancel requested meanwhile: drop the token, apply_cancels frees it
            return
        out.setdefault(seq.loop, []).append((seq.queue, [TokenEvent(token, logprob, reason)]))
        if reason is not None:
            seq.done = True
            self.finish(seq, reason)

    def _reason(self, seq: Seq, token: int) -> FinishReason | None:
        """Why ``seq`` ends with ``token`` (its ``generated`` already counts it), or None."""
        if token in self.eos_ids and not seq.req.params.ignore_eos:
            return "eos_token"
        return "length" if seq.generated >= seq.max_new else None

    def decode_rows(self) -> list[Row]:
        """The rows of the next decode step: every live sequence that still needs a token, each
        advanced by one position (a row finishing at step k has already been given step k+1)."""
        rows = []
        for seq in self.slots:
            if seq is None or seq.done or seq.prefilling or seq.launched >= seq.max_new:
                continue
            rows.append((seq, seq.slot, seq.pos))
            seq.pos += 1
            seq.launched += 1
        return rows

    def decoded(self, rows: list[Row], host: list[list[float]], out: Out) -> int:
        """Emit a collected step's tokens (``host[slot] = [token, logprob]``); returns how many.

        :meth:`emit` for every live row, with the per-token work kept to the minimum (this runs for every
        token the engine makes): consecutive rows of one event loop share its list."""
        n = 0
        loop = items = None
        for seq, slot, _pos in rows:
            if seq.slot != slot or seq.done:    # finished, cancelled or slot reused meanwhile
                continue
            n += 1
            tok, lp = host[slot]
            token = int(tok)
            seq.generated += 1
            reason = self._reason(seq, token)
            if seq.loop is not loop:
                loop = seq.loop
                items = out.setdefault(loop, [])
            items.append((seq.queue, [TokenEvent(token, lp, reason)]))
            if reason is not None:
                seq.done = True
                self.finish(seq, reason)
        return n
