"""The part both APIs share: admit a request, run it on the engine, stream text steps back.

``run_generation`` turns engine token events into :class:`Step` objects carrying the text delta
(incremental detokenization, stop sequences cut out), and guarantees the engine request is cancelled
when the consumer goes away (client disconnect, handler cancelled) or a stop sequence matches.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from model_server.engines.base import GenerationRequest, SamplingParams
from model_server.text import IncrementalDetokenizer, StopMatcher


class ApiError(Exception):
    """A client-visible error; each API renders it in its own format."""

    def __init__(self, status: int, message: str, kind: str = "validation", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind          # validation | overloaded | unavailable | not_found | generation
        self.param = param
        self.code = code


@dataclass
class Step:
    """One generated token and the text it releases (``text`` may be empty)."""

    token_id: int | None
    text: str
    logprob: float | None = None
    special: bool = False
    finish_reason: str | None = None          # length | eos_token | stop_sequence | cancelled | error
    error: str | None = None
    more: bool = False                        # another token is already waiting: the writer may batch


@dataclass
class Outcome:
    """What a finished generation produced (filled in as it runs)."""

    prompt_tokens: int
    generated_tokens: int = 0
    text: str = ""
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    first_token_ns: int = 0
    end_ns: int = 0


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


async def run_generation(runtime: Any, api: str, prompt_ids: list[int], params: SamplingParams,
                         stops: list[str], outcome: Outcome, arrival_ns: int) -> AsyncIterator[Step]:
    """Run one request; yields a :class:`Step` per generated token, the last with ``finish_reason``.

    Metrics (status, finish reason, tokens, phase times) are recorded here, exactly once per request.
    """
    engine = runtime.engine
    metrics = runtime.metrics
    tokenizer = runtime.loaded.tokenizer
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    rid = new_request_id(api)
    request = GenerationRequest(rid, list(prompt_ids), params, arrival_ns=arrival_ns)
    detok = IncrementalDetokenizer(tokenizer)
    stopper = StopMatcher(stops)
    status = "error"
    metrics.prompt_tokens.inc(len(prompt_ids))
    runtime.in_flight += 1
    metrics.in_flight.inc()
    events = None
    pending = getattr(engine, "pending_events", None)
    try:
        try:
            events = engine.submit(request)
        except Exception as exc:  # an engine bug must not leak the in-flight count or crash the handler
            outcome.finish_reason = "error"
            yield Step(None, "", None, False, "error", f"engine refused the request: {type(exc).__name__}: {exc}")
            return
        async for ev in events:
            now = time.monotonic_ns()
            if ev.token_id is not None:
                outcome.generated_tokens += 1
                outcome.token_ids.append(ev.token_id)
                metrics.generation_tokens.inc()
                if not outcome.first_token_ns:
                    outcome.first_token_ns = now
                    metrics.ttft_seconds.observe((now - arrival_ns) / 1e9)
                delta = detok.add(ev.token_id)
                reason = ev.finish_reason
                if reason is not None and reason not in ("cancelled", "error"):
                    delta += detok.flush()
                text, stopped = stopper.push(delta)
                if stopped:
                    outcome.text += text
                    outcome.finish_reason = "stop_sequence"
                    engine.cancel(rid)
                    status = "success"
                    yield Step(ev.token_id, text, ev.logprob, ev.token_id in special_ids, "stop_sequence")
                    return
                if reason is not None and reason not in ("cancelled", "error"):
                    text += stopper.flush()
                outcome.text += text
                if reason is not None:
                    outcome.finish_reason = reason
                    status = {"cancelled": "cancelled", "error": "error"}.get(reason, "success")
                more = reason is None and pending is not None and pending(rid) > 0
                yield Step(ev.token_id, text, ev.logprob, ev.token_id in special_ids, reason, ev.error, more)
                if reason is not None:
                    return
            elif ev.finish_reason is not None:
                tail = ""
                if ev.finish_reason not in ("cancelled", "error"):
                    tail = stopper.push(detok.flush())[0] + stopper.flush()
                outcome.text += tail
                outcome.finish_reason = ev.finish_reason
                status = {"cancelled": "cancelled", "error": "error"}.get(ev.finish_reason, "success")
                yield Step(None, tail, None, False, ev.finish_reason, ev.error)
                return
        # the engine's stream ended without a final event: treat as an engine error
        outcome.finish_reason = "error"
        status = "error"
        yield Step(None, "", None, False, "error", "engine stream ended without a finish event")
    except (asyncio.CancelledError, GeneratorExit, ConnectionResetError):
        status = "cancelled"
        outcome.finish_reason = outcome.finish_reason or "cancelled"
        raise
    finally:
        if outcome.finish_reason in (None, "cancelled") and status != "success":
            status = "cancelled"
        engine.cancel(rid)           # no-op when finished; frees the slot otherwise
        aclose = getattr(events, "aclose", None) if events is not None else None
        if aclose is not None:
            try:
                await aclose()
            except BaseException:  # noqa: BLE001 - closing a cancelled generator must not raise here
                pass
        outcome.end_ns = time.monotonic_ns()
        runtime.in_flight -= 1
        metrics.in_flight.dec()
        metrics.requests.labels(api, status).inc()
        if outcome.finish_reason:
            metrics.finish.labels(api, outcome.finish_reason).inc()
        if outcome.first_token_ns:
            metrics.duration_seconds.observe((outcome.end_ns - arrival_ns) / 1e9)
        timing = engine.timing(rid)
        if timing is not None:
            metrics.queue_seconds.observe(timing.queue_seconds)
            metrics.prefill_seconds.observe(timing.prefill_seconds)
            metrics.decode_seconds.observe(timing.decode_seconds)
            if timing.batch_size_at_admission:
                metrics.batch_size.observe(timing.batch_size_at_admission)
