"""The one interface between the HTTP layer (TGI and OpenAI APIs) and a generation engine.

Two engines implement it: ``transformers`` (transformers' own continuous batching, the fallback and
the baseline) and ``fast`` (our batched decode loop over a preallocated KV cache with CUDA graphs).

Contract
--------
* ``submit()`` is called from the asyncio event loop and returns an async iterator of
  :class:`TokenEvent`. The engine runs its own loop on a background thread; it must never block the
  event loop. Tokens are delivered as they are produced (one event per generated token).
* The last event of a request has ``finish_reason`` set (``length`` | ``eos_token`` |
  ``cancelled`` | ``error``). Stop *sequences* (text level) are handled by the HTTP layer, which
  calls ``cancel()`` once one matches; engines handle EOS and ``max_new_tokens``.
* ``cancel(request_id)`` frees the request's slot at once; the iterator then ends with a
  ``cancelled`` event (or simply ends if the consumer already stopped reading).
* Closing the iterator early (``aclose()``, or the consumer task being cancelled) must also cancel.
* ``stats()`` is cheap and thread-safe; the HTTP layer exports it as Prometheus metrics.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import AsyncIterator, Literal, NamedTuple

FinishReason = Literal["length", "eos_token", "stop_sequence", "cancelled", "error"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation parameters (already validated by the HTTP layer)."""

    max_new_tokens: int = 20
    do_sample: bool = False          # False: greedy (temperature/top_p/top_k ignored)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                   # 0: disabled
    seed: int | None = None
    ignore_eos: bool = False


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_ns: int = 0              # time.monotonic_ns() when the HTTP layer received it


class TokenEvent(NamedTuple):
    """One event of a request's stream (immutable; a named tuple, as cheap to make as the engines make them:
    one per generated token)."""

    token_id: int | None             # None only on a final event that carries no token
    logprob: float | None = None
    finish_reason: FinishReason | None = None   # set on the last event only
    error: str | None = None


@dataclass
class EngineStats:
    """A snapshot for /metrics and /info. Times in seconds, counts as integers."""

    waiting_requests: int = 0
    running_requests: int = 0
    max_batch_size: int = 0
    steps_total: int = 0
    prefill_calls_total: int = 0        # prefill passes (each stalls the decode batch once)
    prefill_tokens_total: int = 0
    decode_tokens_total: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class RequestTiming:
    """Per-request phase times the engine observed (seconds), for model_server_* histograms."""

    queue_seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    batch_size_at_admission: int = 0


class Engine(abc.ABC):
    """A generation engine serving one loaded model."""

    name: str = "abstract"
    supports_seed: bool = False     # samples a request from its own seed (model_server.compat)

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the background loop (and run warm-up if any)."""

    @abc.abstractmethod
    async def stop(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        """Stop accepting requests; with ``drain`` finish in-flight ones first (bounded by timeout)."""

    @abc.abstractmethod
    def submit(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Queue a request and return its token stream."""

    @abc.abstractmethod
    def cancel(self, request_id: str) -> None:
        """Cancel a queued or running request; frees its slot at once. Unknown ids are ignored."""

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """Cheap, thread-safe snapshot."""

    def timing(self, request_id: str) -> RequestTiming | None:
        """Phase times of a finished request, if the engine tracks them (popped on read)."""
        return None
