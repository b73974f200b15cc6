"""The phases of one cold start, as the proxy sees them.

Milestones (monotonic ns on the proxy's clock), in order::

    hold_start     the first request finds no ready backend (or a crashed backend is restarted)
    process_start  the supervisor started the backend process; without a local supervisor, the
                   backend's own ``startup.process_start`` from ``/info`` (the scale signal landed)
    listening      the backend answers HTTP. Observed by polling, so an upper bound; the model
                   server listens before it loads, so it is capped at the reported load_start
    load_start     model load begins   (``/info`` ``startup.load_start``, converted from epoch)
    load_end       model load ends     (``/info`` ``startup.load_end``)
    ready          the proxy sees the backend ready (``/health`` 200 and ``/info`` ``ready``)
    first_token    first content token of the first request released after the cold start

Segments (the ``phase`` label of ``edge_proxy_cold_start_duration_seconds``) run between
consecutive milestones, named for what happens in them:

    spawn        hold_start    -> process_start
    listen       process_start -> listening     (interpreter start, imports, server bind)
    init         listening     -> load_start
    load         load_start    -> load_end
    warmup       load_end      -> ready          (warm-up, readiness flip, readiness poll)
    first_token  ready         -> first_token    (release, prefill, first decode step)
    to_ready     hold_start    -> ready
    total        hold_start    -> first_token
"""
from __future__ import annotations

from dataclasses import dataclass, field

MILESTONES: tuple[str, ...] = (
    "hold_start", "process_start", "listening", "load_start", "load_end", "ready", "first_token",
)

SEGMENTS: tuple[tuple[str, str, str], ...] = (
    ("spawn", "hold_start", "process_start"),
    ("listen", "process_start", "listening"),
    ("init", "listening", "load_start"),
    ("load", "load_start", "load_end"),
    ("warmup", "load_end", "ready"),
    ("first_token", "ready", "first_token"),
    ("to_ready", "hold_start", "ready"),
    ("total", "hold_start", "first_token"),
)


@dataclass
class ColdStartTimeline:
    """Milestones of one cold start (monotonic ns; None = not seen)."""

    hold_start: int
    process_start: int | None = None
    listening: int | None = None
    load_start: int | None = None
    load_end: int | None = None
    ready: int | None = None
    first_token: int | None = None
    # Where each milestone came from: "proxy" (observed here) or "backend" (reported in /info).
    sources: dict[str, str] = field(default_factory=dict)

    def set(self, name: str, t_ns: int | None, source: str = "proxy", *, overwrite: bool = False) -> None:
        if name not in MILESTONES:
            raise ValueError(f"unknown milestone {name!r}")
        if t_ns is None:
            return
        if getattr(self, name) is None or overwrite:
            setattr(self, name, int(t_ns))
            self.sources[name] = source

    def as_dict(self) -> dict[str, int | None]:
        return {m: getattr(self, m) for m in MILESTONES}

    def offsets_seconds(self) -> dict[str, float | None]:
        """Each milestone relative to hold_start, in seconds."""
        return {m: (None if v is None else (v - self.hold_start) / 1e9) for m, v in self.as_dict().items()}


def segment_seconds(timeline: ColdStartTimeline) -> dict[str, float]:
    """Duration of every segment whose two milestones are known: ``(t_end - t_start) / 1e9`` s.

    A negative segment (a backend that started before the hold began, or clock skew across hosts)
    is clamped to 0 here; the raw milestones stay in the timeline and the span.
    """
    out: dict[str, float] = {}
    for label, a, b in SEGMENTS:
        ta, tb = getattr(timeline, a), getattr(timeline, b)
        if ta is None or tb is None:
            continue
        out[label] = max(0.0, (tb - ta) / 1e9)
    return out


def milestones_in_order(timeline: ColdStartTimeline) -> bool:
    """True when the known milestones are non-decreasing in the documented order."""
    known = [v for v in timeline.as_dict().values() if v is not None]
    return all(x <= y for x, y in zip(known, known[1:]))
