"""Fast paths over prometheus-client for the proxy's per-request work, on its public API only.

``metric.labels(...)`` validates its arguments and takes a lock on every call (about 1.5 us here);
the proxy records ~10 labelled samples per request, so :class:`Children` keeps each label
combination's child after its first lookup. Labels are bounded by design (docs/metrics.md), and the
cache is bounded too. :class:`BatchHistogram` is a histogram whose children take many observations
at once (:func:`observe_many`: a streamed request observes one inter-token gap per token) with one
lock and one increment per touched bucket; it is a custom collector exported through
``HistogramMetricFamily``, with the exposition of ``prometheus_client.Histogram`` (tested sample by
sample in ``tests/test_metric_children.py``). Nothing here reads prometheus-client's private
attributes.
"""
from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from typing import Any, Iterable, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

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


class BatchHistogramChild:
    """One label combination of a :class:`BatchHistogram`: per-bucket counts (not cumulative), sum."""

    __slots__ = ("bounds", "counts", "total", "created", "lock")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.total = 0.0
        self.created = time.time()
        self.lock = threading.Lock()

    def observe(self, value: float) -> None:
        self.observe_many((value,))

    def observe_many(self, values: Iterable[float]) -> None:
        """The same as ``observe`` once per value (``prometheus_client.Histogram`` semantics: a
        value goes to the first bucket whose bound is >= it; NaN to the sum only)."""
        bounds = self.bounds
        touched: dict[int, int] = {}
        s = 0.0
        n = 0
        for v in values:
            s += v
            n += 1
            if v != v:                       # NaN: observe() adds it to the sum, to no bucket
                continue
            i = bisect_left(bounds, v)       # first bound >= v (the last bound is +Inf)
            touched[i] = touched.get(i, 0) + 1
        if not n:
            return
        with self.lock:
            self.total += s
            for i, c in touched.items():
                self.counts[i] += c

    def snapshot(self) -> tuple[list[int], float]:
        with self.lock:
            return list(self.counts), self.total


class BatchHistogram(Collector):
    """A labelled histogram (``labels(...)``, ``observe``) with :meth:`BatchHistogramChild.observe_many`."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 buckets: Sequence[float], registry: CollectorRegistry | None = None) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(bounds)
        self._children: dict[tuple[str, ...], BatchHistogramChild] = {}
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> BatchHistogramChild:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values!r}")
        key = tuple(str(v) for v in values)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = BatchHistogramChild(self.bounds)
        return child

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=list(self.labelnames))

    def describe(self) -> list[HistogramMetricFamily]:
        return [self._family()]

    def collect(self) -> list[HistogramMetricFamily]:
        fam = self._family()
        with self._lock:
            children = list(self._children.items())
        les = [floatToGoString(b) for b in self.bounds]
        for key, child in children:
            counts, total = child.snapshot()
            cum, acc = [], 0
            for le, c in zip(les, counts):
                acc += c
                cum.append((le, float(acc)))
            fam.add_metric(list(key), cum, total)
            fam.samples.append(Sample(self.name + "_created", dict(zip(self.labelnames, key)),
                                      child.created))
        return [fam]


def observe_many(hist_child: Any, values: Iterable[float]) -> None:
    """Observe every value of ``values`` in a histogram child: the same result as calling
    ``observe`` once per value. A :class:`BatchHistogramChild` takes them in one step; any other
    child (``prometheus_client.Histogram``'s) gets ``observe`` per value."""
    batch = getattr(hist_child, "observe_many", None)
    if batch is not None:
        batch(values)
        return
    for v in values:
        hist_child.observe(v)
