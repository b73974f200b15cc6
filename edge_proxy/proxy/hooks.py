"""Extension points of the proxy: what the energy ledger, economics, tracing and cold-start code
plug into. The proxy (``edge_proxy.proxy.forward``) owns the per-request :class:`RequestRecord`;
``edge_proxy.proxy.bookkeeping`` calls the observers; neither knows what they do. Must not: import
any component.

Lifecycle of one request as the observers see it::

    on_request_start(rec)                       # after parsing, before forwarding
    on_tokens(rec, n, t_ns)                     # n output tokens seen at monotonic time t_ns
                                                # (the first call is the first content token)
    on_request_end(rec)                         # outcome known (ok | error | cancelled | rejected)
    await finalize(rec)                         # awaited in a background task after the end:
                                                # energy becomes final here (tick after the end)
    on_request_final(rec)                       # everything known: metrics, access log, span end

Observers must be cheap and must never raise into the proxy: the proxy wraps every call and logs
(once) an observer that fails. Nothing here may block the event loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

Outcome = Literal["ok", "error", "cancelled", "rejected", "timeout"]


@dataclass
class EnergyAttribution:
    """Joules attributed to one request by the ledger."""

    active_joules: float = 0.0       # share of the non-idle energy of the ticks it overlapped
    full_joules: float = 0.0         # active + its share of idle power while it ran
    source: str = "none"             # nvml | remote | replay | estimated | none
    attribution: str = "token-weighted"
    provisional: bool = True         # False once the tick after the request's end has closed
    prefill_joules: float | None = None   # part of full up to the first token's tick (one response: by weight)
    decode_joules: float | None = None    # the rest of full (docs/metrics.md: prefill and decode)


@dataclass
class RequestRecord:
    """The timeline of one proxied request. All times are ``time.monotonic_ns()``."""

    request_id: str                            # the proxy's own (random, unguessable): the key everywhere
    route: str                                 # e.g. /v1/chat/completions, /generate_stream
    api: Literal["openai", "tgi", "other"]
    operation: str = "other"                   # gen_ai.operation.name: chat | text_completion | other
    model: str = "unknown"                     # bounded: the configured/served model name
    stream: bool = False
    traffic: Literal["user", "probe"] = "user"
    max_tokens: int | None = None
    t_received_ns: int = 0
    t_forwarded_ns: int | None = None
    t_backend_headers_ns: int | None = None
    t_first_token_ns: int | None = None
    t_last_token_ns: int | None = None
    t_end_ns: int | None = None
    token_times_ns: list[int] = field(default_factory=list)   # one entry per output token
    input_tokens: int | None = None
    output_tokens: int | None = None
    token_count_source: Literal["backend", "chunks", "none"] = "none"
    backend_queue_seconds: float | None = None
    status: int | None = None                  # HTTP status sent to the client
    outcome: Outcome | None = None
    error_type: str | None = None              # bounded vocabulary: connect | timeout | upstream_status | stream_broken | client_disconnect | bad_request | too_large | client_timeout | hold_timeout | hold_full | spawn_failed | internal (a proxy bug: logged)
    finish_reason: str | None = None
    energy: EnergyAttribution | None = None
    cold_start: bool = False
    cold_start_wait_seconds: float | None = None
    extra: dict[str, object] = field(default_factory=dict)
    client_request_id: str | None = None       # the client's x-request-id: a label (logs, spans), never a key

    # Derived values (seconds); None when undefined.
    @property
    def ttft_seconds(self) -> float | None:
        if self.t_first_token_ns is None:
            return None
        return (self.t_first_token_ns - self.t_received_ns) / 1e9

    @property
    def duration_seconds(self) -> float | None:
        if self.t_end_ns is None:
            return None
        return (self.t_end_ns - self.t_received_ns) / 1e9

    @property
    def tpot_seconds(self) -> float | None:
        """TPOT = (t_last - t_first) / (n_out - 1); undefined for fewer than two output tokens."""
        n = self.output_tokens
        if n is None or n < 2 or self.t_first_token_ns is None or self.t_last_token_ns is None:
            return None
        return (self.t_last_token_ns - self.t_first_token_ns) / 1e9 / (n - 1)


class RequestObserver(Protocol):
    def on_request_start(self, rec: RequestRecord) -> None: ...
    def on_tokens(self, rec: RequestRecord, n: int, t_ns: int) -> None: ...
    def on_request_end(self, rec: RequestRecord) -> None: ...
    async def finalize(self, rec: RequestRecord) -> None: ...
    def on_request_final(self, rec: RequestRecord) -> None: ...


class BaseObserver:
    """No-op defaults so an observer implements only what it needs. ``first_token_only``: the
    observer needs only a stream's first ``on_tokens`` call (it reads the later token times from
    ``rec.token_times_ns`` itself), so the proxy calls it for the first token event only."""

    first_token_only = False

    def on_request_start(self, rec: RequestRecord) -> None:
        return None

    def on_tokens(self, rec: RequestRecord, n: int, t_ns: int) -> None:
        return None

    def on_request_end(self, rec: RequestRecord) -> None:
        return None

    async def finalize(self, rec: RequestRecord) -> None:
        return None

    def on_request_final(self, rec: RequestRecord) -> None:
        return None


class BackendGate(Protocol):
    """Cold-start gate (hold mode). ``acquire`` returns once the backend is ready, or raises
    :class:`GateRejected` (the proxy answers 503 in the client API's format)."""

    async def acquire(self, rec: RequestRecord) -> None: ...
    def notify_backend_failure(self) -> None: ...
    def notify_activity(self) -> None: ...


class GateRejected(Exception):
    def __init__(self, reason: str, message: str, retry_after_seconds: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason      # hold_timeout | hold_full | spawn_failed | draining
        self.message = message
        self.retry_after_seconds = retry_after_seconds   # the 503 carries Retry-After when set
