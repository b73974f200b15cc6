"""The metric fast paths record exactly what prometheus-client's own calls record."""
from __future__ import annotations

import math

from hypothesis import given, settings, strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram

from edge_proxy.economics.metric_children import BatchHistogram, Children, observe_many
from edge_proxy.telemetry.metrics import TPOT_BUCKETS

def samples(reg: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    """Every sample but the creation timestamps; NaN compared as a string."""
    return [(s.name, s.labels, repr(s.value)) for m in reg.collect() for s in m.samples
            if not s.name.endswith("_created")]


values = st.lists(st.one_of(
    st.floats(min_value=-1.0, max_value=10.0, allow_nan=False),
    st.sampled_from(list(TPOT_BUCKETS)),            # exactly on an edge: le is inclusive
    st.just(math.inf)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(values)
def test_observe_many_equals_observe_per_value(xs: list[float]) -> None:
    r1, r2 = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("itl_seconds", "x", ["model"], buckets=TPOT_BUCKETS, registry=r1)
    h2 = BatchHistogram("itl_seconds", "x", ["model"], buckets=TPOT_BUCKETS, registry=r2)
    c1 = h1.labels("m")
    for x in xs:
        c1.observe(x)
    observe_many(h2.labels("m"), xs)
    assert samples(r1) == samples(r2)


def test_batch_histogram_exposition_is_prometheus_clients() -> None:
    """Same text exposition as prometheus_client.Histogram (HELP/TYPE, le strings, _created), and
    a registry refuses a second metric of its name (describe() names it)."""
    from prometheus_client import generate_latest
    import pytest

    r1, r2 = CollectorRegistry(), CollectorRegistry(auto_describe=True)
    h1 = Histogram("itl_seconds", "doc", ["model", "route"], buckets=(0.1, 1.0), registry=r1)
    h2 = BatchHistogram("itl_seconds", "doc", ["model", "route"], buckets=(0.1, 1.0), registry=r2)
    for x in (0.05, 0.1, 0.7, 3.0):
        h1.labels("m", "/v1").observe(x)
        h2.labels("m", "/v1").observe(x)
    h1.labels("n", "/v1").observe(0.2)
    observe_many(h2.labels("n", "/v1"), [0.2])
    strip = lambda reg: [line for line in generate_latest(reg).decode().splitlines()
                         if not line.startswith("itl_seconds_created")]
    assert strip(r1) == strip(r2)
    assert r2.get_sample_value("itl_seconds_created", {"model": "m", "route": "/v1"}) > 0
    with pytest.raises(ValueError, match="Duplicated"):
        Histogram("itl_seconds", "x", registry=r2)
    with pytest.raises(ValueError, match="expected labels"):
        h2.labels("only-one")


def test_observe_many_nan_goes_to_sum_only_like_observe() -> None:
    r1, r2 = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("a_seconds", "x", registry=r1, buckets=(0.1, 1.0))
    h2 = Histogram("a_seconds", "x", registry=r2, buckets=(0.1, 1.0))
    for x in (0.05, float("nan"), 2.0):
        h1.observe(x)
    observe_many(h2, [0.05, float("nan"), 2.0])
    assert samples(r1) == samples(r2)


def test_observe_many_falls_back_without_internals() -> None:
    class Plain:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, v: float) -> None:
            self.seen.append(v)

    p = Plain()
    observe_many(p, [0.1, 0.2])
    assert p.seen == [0.1, 0.2]


def test_children_return_the_labelled_child_and_stay_bounded() -> None:
    reg = CollectorRegistry()
    c = Counter("reqs", "x", ["model", "route"], registry=reg)
    ch = Children(c, max_children=2)
    assert ch("a", "/x") is c.labels("a", "/x")
    ch("a", "/x").inc()
    ch("b", "/x").inc(2)
    ch("c", "/x").inc(3)          # past the cache bound: still the right child, not cached
    assert len(ch._cache) == 2
    assert reg.get_sample_value("reqs_total", {"model": "a", "route": "/x"}) == 1
    assert reg.get_sample_value("reqs_total", {"model": "c", "route": "/x"}) == 3
