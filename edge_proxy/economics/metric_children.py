"""Fast paths over prometheus-client for the proxy's per-request work.

``metric.labels(...)`` validates its arguments and takes a lock on every call (about 1.5 us here);
the proxy records ~10 labelled samples per request, so :class:`Children` keeps each label
combination's child after its first lookup. Labels are bounded by design (docs/metrics.md), and the
cache is bounded too. :func:`observe_many` records many observations into one histogram child with
one increment per touched bucket (a streamed request observes one inter-token gap per token).
"""
from __future__ import annotations

from bisect import bisect_left
from typing import Any, Iterable

MAX_CHILDREN = 10_000


class Children:
    """``children(*label_values)`` == ``metric.labels(*label_values)``, looked up once.

    Only for series that are never removed (the proxy never removes one)."""

    __slots__ = ("metric", "_cache", "_max")

    def __init__(self, metric: Any, max_children: int = MAX_CHILDREN) -> None:
        self.metric = metric
        self._cache: dict[tuple[str, ...], Any] = {}
        self._max = max_children

    def __call__(self, *values: str) -> Any:
        child = self._cache.get(values)
        if child is None:
            child = self.metric.labels(*values)
            if len(self._cache) < self._max:
                self._cache[values] = child
        return child


def observe_many(hist_child: Any, values: Iterable[float]) -> None:
    """Observe every value of ``values`` in a histogram child: the same result as calling
    ``observe`` once per value (bucket counts, sum, count), with one increment per bucket touched.

    Uses prometheus-client's histogram internals (``_upper_bounds``, ``_buckets``, ``_sum``) when
    they are there, else falls back to ``observe`` per value."""
    bounds = getattr(hist_child, "_upper_bounds", None)
    buckets = getattr(hist_child, "_buckets", None)
    total = getattr(hist_child, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for v in values:
            hist_child.observe(v)
        return
    counts: dict[int, int] = {}
    s = 0.0
    n = 0
    for v in values:
        s += v
        n += 1
        if v != v:                       # NaN: observe() adds it to the sum, to no bucket
            continue
        i = bisect_left(bounds, v)       # first bound >= v: observe()'s "v <= bound" bucket
        counts[i] = counts.get(i, 0) + 1
    if not n:
        return
    total.inc(s)
    last = len(buckets)
    for i, c in counts.items():
        if i < last:                     # (the +Inf bound catches every other value)
            buckets[i].inc(c)
