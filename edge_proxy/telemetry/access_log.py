"""One JSON line per request with its timeline summary and token counts. Writes what the record
holds: must not compute, time or change anything.

Never contains prompt or completion text unless ``proxy.log_content`` is on (then the request body,
truncated, is stored under ``content`` by the proxy core). Destination: ``-`` (stderr), a file path
(appended), or None (off).
"""
from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

from edge_proxy.proxy.hooks import BaseObserver, RequestRecord


def _ms(ns: int | None, t0: int) -> float | None:
    return None if ns is None else round((ns - t0) / 1e6, 3)


def access_record(rec: RequestRecord) -> dict[str, Any]:
    """The logged fields (times in ms from receipt unless named ``_seconds``)."""
    t0 = rec.t_received_ns
    out: dict[str, Any] = {
        "ts": round(time.time(), 3),
        "request_id": rec.request_id,
        "client_request_id": rec.client_request_id,
        "route": rec.route,
        "api": rec.api,
        "operation": rec.operation,
        "model": rec.model,
        "stream": rec.stream,
        "traffic": rec.traffic,
        "status": rec.status,
        "outcome": rec.outcome,
        "error_type": rec.error_type,
        "finish_reason": rec.finish_reason,
        "input_tokens": rec.input_tokens,
        "output_tokens": rec.output_tokens,
        "token_count_source": rec.token_count_source,
        "forwarded_ms": _ms(rec.t_forwarded_ns, t0),
        "backend_headers_ms": _ms(rec.t_backend_headers_ns, t0),
        "first_token_ms": _ms(rec.t_first_token_ns, t0),
        "last_token_ms": _ms(rec.t_last_token_ns, t0),
        "end_ms": _ms(rec.t_end_ns, t0),
        "ttft_seconds": rec.ttft_seconds,
        "tpot_seconds": rec.tpot_seconds,
        "duration_seconds": rec.duration_seconds,
        "backend_queue_seconds": rec.backend_queue_seconds,
        "cold_start": rec.cold_start,
        "cold_start_wait_seconds": rec.cold_start_wait_seconds,
    }
    if rec.energy is not None:
        out["energy"] = {
            "active_joules": rec.energy.active_joules,
            "full_joules": rec.energy.full_joules,
            "source": rec.energy.source,
            "attribution": rec.energy.attribution,
            "provisional": rec.energy.provisional,
            "prefill_joules": rec.energy.prefill_joules,
            "decode_joules": rec.energy.decode_joules,
        }
    for key in ("economics", "trace_id"):
        if key in rec.extra:
            out[key] = rec.extra[key]
    if "content" in rec.extra:
        out["content"] = rec.extra["content"]
    return out


class AccessLog(BaseObserver):
    def __init__(self, stream: IO[str], close: bool = False) -> None:
        self.stream = stream
        self._close = close

    def on_request_final(self, rec: RequestRecord) -> None:
        self.stream.write(json.dumps(access_record(rec), default=str) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._close:
            self.stream.close()


def create_access_log(target: str | None) -> AccessLog | None:
    if not target:
        return None
    if target == "-":
        return AccessLog(sys.stderr)
    return AccessLog(open(target, "a", encoding="utf-8", buffering=1), close=True)
