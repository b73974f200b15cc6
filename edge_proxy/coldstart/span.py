"""The OpenTelemetry span of one finished cold start: ``cold_start`` from hold start to its end,
one event per milestone (``cold_start.<milestone>``, stamped on the wall clock), the segments as
``edge.cold_start.phase.<segment>_seconds``, its energy (with source) and tax.

Owns: the mapping of a :class:`ColdStart` record to span attributes and events. Must not: compute
anything the record does not hold, or raise (a failed export is logged).
"""
from __future__ import annotations

import logging
import time
from typing import Any

from edge_proxy.coldstart.clock import ClockPair, monotonic_to_epoch_ns
from edge_proxy.coldstart.phases import MILESTONES, segment_seconds
from edge_proxy.coldstart.record import ColdStart

log = logging.getLogger("edge_proxy.coldstart")


def emit_span(tracer: Any, cs: ColdStart, backend_url: str) -> None:
    if tracer is None:
        return
    try:
        pair = ClockPair.now()
        end = cs.end_ns or time.monotonic_ns()
        attrs: dict[str, Any] = {
            "edge.cold_start.id": cs.id,
            "edge.cold_start.reason": cs.reason,
            "edge.cold_start.outcome": cs.outcome or "error",
            "edge.cold_start.held_max": cs.held_max,
            "edge.cold_start.released_requests": cs.released,
            "server.address": backend_url,
        }
        for phase, secs in segment_seconds(cs.timeline).items():
            attrs[f"edge.cold_start.phase.{phase}_seconds"] = secs
        for key, val in (("edge.energy.joules", cs.energy_joules),
                         ("edge.cold_start.load_energy_joules", cs.load_energy_joules),
                         ("edge.cold_start.tax_energy_ratio", cs.tax_energy_ratio),
                         ("edge.cold_start.tax_time_ratio", cs.tax_time_ratio),
                         ("edge.cold_start.keep_warm_break_even_idle_seconds", cs.break_even_idle_seconds)):
            if val is not None:
                attrs[key] = val
        if cs.energy_joules is not None:
            attrs["edge.energy.source"] = cs.energy_source
        if cs.error:
            attrs["error.type"] = "cold_start_" + (cs.outcome or "error")
        span = tracer.start_span("cold_start", start_time=monotonic_to_epoch_ns(cs.timeline.hold_start, pair),
                                 attributes=attrs)
        for m in MILESTONES:
            t = getattr(cs.timeline, m)
            if t is not None:
                span.add_event(f"cold_start.{m}", {"edge.source": cs.timeline.sources.get(m, "proxy")},
                               timestamp=monotonic_to_epoch_ns(t, pair))
        if cs.error:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, cs.error))
        span.end(end_time=monotonic_to_epoch_ns(end, pair))
    except Exception:
        log.exception("cold start: span export failed")
