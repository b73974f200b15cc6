"""Token counts and per-token times from what the backend sends (never by re-tokenising text).

Sources, in order of preference (``RequestRecord.token_count_source``):

- ``backend``: OpenAI ``usage`` (final usage chunk requested with ``stream_options.include_usage``,
  or cumulative per-chunk usage when the backend sends it), TGI ``details.generated_tokens`` /
  ``details.prefill`` / ``details.input_length``, one TGI stream event per token, the model
  server's (and TGI's) ``x-prompt-tokens`` / ``x-generated-tokens`` response headers.
- ``chunks``: an OpenAI stream without usage: one token per content chunk (labelled fallback).
- ``none``: nothing known.

The stream's terminator (``terminated``): OpenAI's ``data: [DONE]``; TGI's last event (the one with
``generated_text`` set). Once it has been written to the client, the request's outcome is final
(docs/metrics.md, Outcomes).

A "content" chunk carries generated text (``delta.content``, ``delta.reasoning_content``,
``delta.tool_calls`` or ``text``); a role-only first chunk is not a token.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable

from edge_proxy.proxy import json_input
from edge_proxy.proxy.hooks import RequestRecord

_USAGE_NULL = re.compile(rb',\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,?')
# Fast path (no JSON parse) for the common OpenAI chunk: only content, no usage object, no finish
# reason, no error. A JSON key can only be matched outside strings: inside a string every quote is
# escaped, so ``"content"`` followed by ``:`` cannot occur there.
_NEEDS_PARSE = re.compile(rb'"usage"\s*:\s*\{|"finish_reason"\s*:\s*"|"error"\s*:|"choices"\s*:\s*\[\s*\]')
_CONTENT = re.compile(rb'"(?:content|text|reasoning_content)"\s*:\s*"(?!")|"tool_calls"\s*:\s*\[')
_TGI_NEEDS_PARSE = re.compile(rb'"details"\s*:\s*\{|"error"\s*:')
_TGI_TOKEN = re.compile(rb'"token"\s*:\s*\{')
_TGI_FINAL = re.compile(rb'"generated_text"\s*:\s*"')

TokenSink = Callable[[int, int], None]   # (n tokens, t_ns)


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _event_object(data: bytes) -> dict[str, Any] | None:
    """The JSON object of one SSE data field, or None when it is not a JSON object."""
    try:
        obj = json_input.loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def apply_response_headers(rec: RequestRecord, headers: Any) -> None:
    """Harvest counts and queue time from backend headers (TGI and our model server set these)."""
    v = headers.get("x-prompt-tokens")
    if v is not None and rec.input_tokens is None:
        try:
            rec.input_tokens = int(v)
        except ValueError:
            pass
    q = headers.get("x-queue-time")   # TGI: milliseconds
    if q is not None:
        try:
            rec.backend_queue_seconds = float(q) / 1000.0
        except ValueError:
            pass
    g = headers.get("x-generated-tokens")
    if g is not None:
        try:
            rec.extra["header_generated_tokens"] = int(g)
        except ValueError:
            pass


class OpenAIStream:
    """Interprets OpenAI SSE chunks: counts tokens, reads usage, strips the usage we asked for."""

    __slots__ = ("rec", "strip_usage", "counted", "usage_output", "sink", "backend_error", "terminated",
                 "held", "fingerprint")

    def __init__(self, rec: RequestRecord, strip_usage: bool, sink: TokenSink) -> None:
        self.rec = rec
        self.strip_usage = strip_usage
        self.counted = 0             # tokens reported to the sink so far
        self.usage_output: int | None = None
        self.sink = sink
        self.backend_error = False
        self.terminated = False      # the terminator ([DONE]) was returned for the client
        # finish_reason chunks held back until the usage chunk we strip (see event)
        self.held: list[bytes] = []
        self.fingerprint: str | None = None     # system_fingerprint of the usage chunk we strip

    def event(self, raw: bytes, data: bytes | None, t_ns: int) -> bytes | None:
        """Process one event; returns the bytes to forward (None: drop it)."""
        if not self.held:
            return self._event(raw, data, t_ns)
        n_held = len(self.held)
        kept = self._event(raw, data, t_ns)
        if len(self.held) > n_held:
            return None                      # another choice's finish chunk: held too
        # The event after held finish_reason chunks. A backend that puts ``system_fingerprint``
        # on the usage chunk we asked for (vLLM) puts it on the finish_reason chunks when the
        # client did not ask for usage: the client gets it there, as from the backend itself.
        held, self.held = self.held, []
        if self.fingerprint is not None:
            held = [_with_fingerprint(ev, self.fingerprint) for ev in held]
        return b"".join(held) + (kept or b"")

    def flush(self) -> bytes:
        """Events still held when the stream ends (sent as they came)."""
        held, self.held = self.held, []
        return b"".join(held)

    def _event(self, raw: bytes, data: bytes | None, t_ns: int) -> bytes | None:
        if data is None or not data.startswith(b"{"):
            if data == b"[DONE]":
                self.terminated = True
            return raw
        if _NEEDS_PARSE.search(data) is None:
            n = len(_CONTENT.findall(data))
            if n:
                self.counted += n
                self.sink(n, t_ns)
            if self.strip_usage and b'"usage"' in raw:
                return _USAGE_NULL.sub(b"", raw)
            return raw
        obj = _event_object(data)
        if obj is None:
            return raw
        if obj.get("error"):
            self.backend_error = True
            return raw
        rec = self.rec
        choices = obj.get("choices") or []
        metrics = obj.get("metrics")      # vLLM --enable-per-request-metrics: on the usage chunk
        if isinstance(metrics, dict) and isinstance(metrics.get("queue_time_ms"), (int, float)) \
                and not isinstance(metrics.get("queue_time_ms"), bool):
            rec.backend_queue_seconds = float(metrics["queue_time_ms"]) / 1000.0
        finishing = False
        n = 0
        for ch in choices:
            if not isinstance(ch, dict):
                continue
            delta = ch.get("delta")
            if isinstance(delta, dict):
                if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
                    n += 1
            elif ch.get("text"):
                n += 1
            fr = ch.get("finish_reason")
            if fr:
                rec.finish_reason = str(fr)
                finishing = True
        usage = obj.get("usage")
        if isinstance(usage, dict):
            pt = _int(usage.get("prompt_tokens"))
            if pt is not None:
                rec.input_tokens = pt
            ct = _int(usage.get("completion_tokens"))
            if ct is not None:
                self.usage_output = ct if self.usage_output is None else max(ct, self.usage_output)
                if choices:
                    # Cumulative per-chunk usage (vLLM continuous_usage_stats): exact tokens per chunk.
                    n = max(ct - self.counted, 0) if n else 0
                elif ct > self.counted:
                    # Final usage chunk says more tokens than chunks seen: account the rest now.
                    n = ct - self.counted
        if n:
            self.counted += n
            self.sink(n, t_ns)
        if self.strip_usage:
            if not choices and isinstance(usage, dict):
                fp = obj.get("system_fingerprint")
                if isinstance(fp, str):
                    self.fingerprint = fp
                return None
            if b'"usage"' in raw:
                raw = _USAGE_NULL.sub(b"", raw)
            if finishing and "system_fingerprint" not in obj:
                # hold it until the next event: the usage chunk may carry the fingerprint
                self.held.append(raw)
                return None
        return raw

    def finish(self) -> None:
        rec = self.rec
        if self.usage_output is not None:
            rec.output_tokens = self.usage_output
            rec.token_count_source = "backend"
        elif self.counted:
            rec.output_tokens = self.counted
            rec.token_count_source = "chunks"
        else:
            rec.output_tokens = 0 if not self.backend_error else None
            rec.token_count_source = "chunks" if not self.backend_error else "none"


def _with_fingerprint(event: bytes, fp: str) -> bytes:
    """``event`` (one ``data:`` line of a JSON object) with ``"system_fingerprint": fp`` added
    before the object's closing brace (where vLLM's serializer puts it), in the event's own
    separator style; every other byte as the backend sent it."""
    end = event.rfind(b"}")
    if end < 0:
        return event
    key = b', "system_fingerprint": ' if b'": ' in event else b',"system_fingerprint":'
    return event[:end] + key + json.dumps(fp).encode() + event[end:]


class TGIStream:
    """Interprets TGI ``/generate_stream`` events: one event per token, final ``details``."""

    __slots__ = ("rec", "counted", "details_output", "sink", "backend_error", "terminated")

    def __init__(self, rec: RequestRecord, sink: TokenSink) -> None:
        self.rec = rec
        self.counted = 0
        self.details_output: int | None = None
        self.sink = sink
        self.backend_error = False
        self.terminated = False      # the last event (generated_text set) was returned for the client

    def event(self, raw: bytes, data: bytes | None, t_ns: int) -> bytes | None:
        if data is None or not data.startswith(b"{"):
            return raw
        if _TGI_NEEDS_PARSE.search(data) is None:
            if _TGI_TOKEN.search(data) is not None:
                self.counted += 1
                self.sink(1, t_ns)
            if _TGI_FINAL.search(data) is not None:
                self.terminated = True
            return raw
        obj = _event_object(data)
        if obj is None:
            return raw
        if obj.get("error"):
            self.backend_error = True
            return raw
        if obj.get("token"):
            self.counted += 1
            self.sink(1, t_ns)
        if isinstance(obj.get("generated_text"), str):
            self.terminated = True
        details = obj.get("details")
        if isinstance(details, dict):
            apply_tgi_details(self.rec, details)
            gt = _int(details.get("generated_tokens"))
            if gt is not None:
                self.details_output = gt
        return raw

    def finish(self) -> None:
        rec = self.rec
        rec.output_tokens = self.details_output if self.details_output is not None else self.counted
        rec.token_count_source = "backend" if (self.details_output is not None or self.counted) else "none"


def apply_tgi_details(rec: RequestRecord, details: dict[str, Any]) -> None:
    fr = details.get("finish_reason")
    if fr:
        rec.finish_reason = str(fr)
    prefill = details.get("prefill")
    if isinstance(prefill, list) and prefill:
        rec.input_tokens = len(prefill)
    il = _int(details.get("input_length"))
    if il is not None:
        rec.input_tokens = il


def account_openai_body(rec: RequestRecord, obj: Any) -> int | None:
    """Non-streaming OpenAI response: returns output tokens (or None) and fills the record."""
    if not isinstance(obj, dict):
        return None
    for ch in obj.get("choices") or []:
        if isinstance(ch, dict) and ch.get("finish_reason"):
            rec.finish_reason = str(ch["finish_reason"])
    metrics = obj.get("metrics")      # vLLM --enable-per-request-metrics
    if isinstance(metrics, dict) and isinstance(metrics.get("queue_time_ms"), (int, float)):
        rec.backend_queue_seconds = float(metrics["queue_time_ms"]) / 1000.0
    usage = obj.get("usage")
    if isinstance(usage, dict):
        pt = _int(usage.get("prompt_tokens"))
        if pt is not None:
            rec.input_tokens = pt
        return _int(usage.get("completion_tokens"))
    return None


def account_tgi_body(rec: RequestRecord, obj: Any) -> int | None:
    """Non-streaming TGI response (``/generate`` object, or ``/`` list of one)."""
    if isinstance(obj, list) and obj:
        obj = obj[0]
    if not isinstance(obj, dict):
        return None
    details = obj.get("details")
    if isinstance(details, dict):
        apply_tgi_details(rec, details)
        return _int(details.get("generated_tokens"))
    return None
