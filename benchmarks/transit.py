"""Noise-cancelled added latency for proxy_overhead.py: the upstream's own stamps and what the
load generator computes from them.

The fast upstream (fake_backend.py, ``stamp=True``) tells the client, per request, three
CLOCK_MONOTONIC times in ns (``time.monotonic_ns()``: one clock for every process on a Linux
host): when its handler got the request (``recv``), when it wrote the first data event (``first``)
and when it wrote its last bytes (``last``). Streaming: as an SSE comment before ``data: [DONE]``
(``: upstream-ns RECV FIRST LAST``, ignored by SSE clients); non-streaming: as the response header
``x-upstream-ns: RECV SEND SEND``. A request's *transit* is what the client measured minus the
upstream's own internal time (TTFT - (first - recv); e2e - (last - recv)): the path there and back
(loopback, the proxy under test, the client's own loop), with the upstream's sleep and scheduling
jitter taken out. Added = median transit(target) - median transit(direct).

Owns: the stamp format (writing and parsing), per-request transit, added transit per interleaved
round and pooled with a bootstrap interval, the "added <= k x nginx's" verdict, and the transit
table. Must NOT: run targets or load (proxy_overhead.py does), or import the proxy.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Protocol, Sequence

from support import pct

STAMP_HEADER = "x-upstream-ns"
_COMMENT = b": upstream-ns "


def stamp_comment(recv_ns: int, first_ns: int, last_ns: int) -> bytes:
    """The SSE comment that carries a streamed response's stamps (no ``data`` in it)."""
    return _COMMENT + b"%d %d %d\n\n" % (recv_ns, first_ns, last_ns)


def stamp_header(recv_ns: int, send_ns: int) -> str:
    """The ``x-upstream-ns`` value of a whole (non-streamed) response: first = last = send."""
    return f"{recv_ns} {send_ns} {send_ns}"


def parse_stamps(text: str | bytes | None) -> tuple[int, int, int] | None:
    """(recv, first, last) ns from a header value or from the tail of a stream that holds the
    comment; None when absent or malformed."""
    if not text:
        return None
    raw = text.encode() if isinstance(text, str) else text
    i = raw.rfind(_COMMENT)
    if i >= 0:
        raw = raw[i + len(_COMMENT):].split(b"\n", 1)[0]
    parts = raw.split()
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    recv, first, last = (int(p) for p in parts)
    return (recv, first, last) if recv <= first <= last else None


@dataclass
class Transit:
    """One request's noise-cancelled times (seconds): ``ttft``/``e2e`` = client-measured time minus
    the upstream's internal time to its first/last write; ``request_leg`` = client send -> upstream
    handler (the shared clock)."""
    ttft: float | None
    e2e: float
    request_leg: float


def transit(t0: float, t_first: float | None, t1: float, stamps: tuple[int, int, int]) -> Transit:
    """A request's transit from the client's monotonic times (s: sent, first data, end) and the
    upstream's stamps (ns)."""
    recv, first, last = stamps
    ttft = None if t_first is None else (t_first - t0) - (first - recv) / 1e9
    return Transit(ttft, (t1 - t0) - (last - recv) / 1e9, recv / 1e9 - t0)


def rounds_of(xs: Sequence[float], ends: Sequence[int]) -> list[list[float]]:
    """Split a cell's samples into its interleaved rounds (``ends``: sample count after each)."""
    out, start = [], 0
    for e in ends:
        out.append([x for x in xs[start:e] if not math.isnan(x)])
        start = e
    return out


def median(xs: Sequence[float]) -> float:
    return pct(xs, 0.5)


def bootstrap_added(target: Sequence[float], direct: Sequence[float], n: int = 300,
                    seed: int = 17) -> tuple[float, float]:
    """95% bootstrap interval (2.5th..97.5th percentile) of median(target) - median(direct),
    each resampled with replacement (seeded: the same data give the same interval)."""
    if not target or not direct:
        return math.nan, math.nan
    rng = random.Random(seed)
    diffs = sorted(median(rng.choices(target, k=len(target))) - median(rng.choices(direct, k=len(direct)))
                   for _ in range(n))
    return pct(diffs, 0.025), pct(diffs, 0.975)


@dataclass
class Added:
    """Added p50 transit of a target over direct (s): pooled over all rounds, each round's own
    (same round's direct), and the bootstrap interval of the pooled value."""
    pooled: float
    per_round: list[float]
    ci: tuple[float, float]

    @property
    def low(self) -> float:
        """The lowest the data allow: the lower of the interval's and the rounds' minima."""
        return min([self.ci[0], *self.per_round])

    @property
    def high(self) -> float:
        return max([self.ci[1], *self.per_round])


def added(target: Sequence[float], t_ends: Sequence[int], direct: Sequence[float],
          d_ends: Sequence[int]) -> Added:
    """Added p50 transit of ``target`` over ``direct`` (both with their round ends)."""
    t_rounds, d_rounds = rounds_of(target, t_ends), rounds_of(direct, d_ends)
    per = [median(t) - median(d) for t, d in zip(t_rounds, d_rounds) if t and d]
    tt = [x for r in t_rounds for x in r]
    dd = [x for r in d_rounds for x in r]
    return Added(median(tt) - median(dd), per, bootstrap_added(tt, dd))


def verdict(ours: Added, ref: Added, factor: float = 2.0) -> str:
    """``ours`` <= ``factor`` x ``ref``? "met" when even our highest is at most factor x ref's
    lowest, "not met" when our lowest is above factor x ref's highest, else "unresolved" (highest
    and lowest: over the bootstrap interval and the per-round values)."""
    if ours.high <= factor * ref.low:
        return "met"
    if ours.low > factor * ref.high:
        return "not met"
    return "unresolved"


def fmt(a: Added) -> str:
    """``pooled [round min..max] (CI lo..hi)`` in ms."""
    r = f"{min(a.per_round) * 1e3:.2f}..{max(a.per_round) * 1e3:.2f}" if a.per_round else "-"
    return f"{a.pooled * 1e3:.2f} [{r}] ({a.ci[0] * 1e3:.2f}..{a.ci[1] * 1e3:.2f})"


class TransitCell(Protocol):
    """What :func:`report` reads of a proxy_overhead.Cell."""
    target: str
    stream: bool
    concurrency: int
    ttft_transit: list[float]
    e2e_transit: list[float]
    request_leg: list[float]
    round_ends: list[int]
    ttft_round_ends: list[int]
    unstamped: int


def _mode(c: TransitCell) -> str:
    return "stream" if c.stream else "non-stream"


def _ms_p50(xs: Sequence[float]) -> str:
    xs = [x for x in xs if not math.isnan(x)]
    return f"{median(xs) * 1e3:.2f}" if xs else "-"


def report(cells: Sequence[TransitCell], default: str = "edge-proxy", ref: str = "nginx",
           factor: float = 2.0) -> dict[tuple[str, bool, int], dict[str, object]]:
    """Print the transit table and the verdict lines ("``default``'s added p50 <= ``factor`` x
    ``ref``'s"); return both per cell key (target, stream, concurrency) for the JSON:
    ``{"added_transit": {metric: Added's fields}, "verdict_vs_<ref>": {metric: verdict}}``."""
    by = {(c.target, c.stream, c.concurrency): c for c in cells}
    adds: dict[tuple[str, bool, int], dict[str, Added]] = {}
    print("\nNoise-cancelled (transit = client time - the upstream's own time; added = median transit - "
          "direct's: pooled [per-round min..max] (95% bootstrap interval), ms)\n")
    print("| mode | conc | target | transit TTFT p50 | added TTFT p50 | transit e2e p50 | added e2e p50 "
          "| request leg p50 | unstamped |")
    print("|---|---:|---|---:|---|---:|---|---:|---:|")
    summary: dict[tuple[str, bool, int], dict[str, object]] = {}
    for c in cells:
        d = by[("direct", c.stream, c.concurrency)]
        row: dict[str, Added] = {}
        if c.target != "direct":
            row["e2e"] = added(c.e2e_transit, c.round_ends, d.e2e_transit, d.round_ends)
            if c.stream:
                row["ttft"] = added(c.ttft_transit, c.ttft_round_ends, d.ttft_transit, d.ttft_round_ends)
        adds[(c.target, c.stream, c.concurrency)] = row
        summary[(c.target, c.stream, c.concurrency)] = {"added_transit": {k: v.__dict__ for k, v in row.items()}}
        a_tt = fmt(row["ttft"]) if "ttft" in row else "-"
        a_e2e = fmt(row["e2e"]) if "e2e" in row else "-"
        print(f"| {_mode(c)} | {c.concurrency} | {c.target} | {_ms_p50(c.ttft_transit) if c.stream else '-'} | "
              f"{a_tt} | {_ms_p50(c.e2e_transit)} | {a_e2e} | {_ms_p50(c.request_leg)} | {c.unstamped} |")
    print()
    for c in cells:
        theirs_row = adds.get((ref, c.stream, c.concurrency))
        if c.target != default or theirs_row is None:
            continue
        for metric, ours in adds[(c.target, c.stream, c.concurrency)].items():
            theirs = theirs_row[metric]
            v = verdict(ours, theirs, factor)
            verdicts = summary[(c.target, c.stream, c.concurrency)].setdefault(f"verdict_vs_{ref}", {})
            verdicts[metric] = v  # type: ignore[index]
            print(f"{_mode(c)} {c.concurrency}: {default} added {metric} p50 {ours.pooled * 1e3:.2f} ms "
                  f"(range {ours.low * 1e3:.2f}..{ours.high * 1e3:.2f}) vs {factor:g}x {ref}'s "
                  f"{factor * theirs.pooled * 1e3:.2f} ms (range {factor * theirs.low * 1e3:.2f}.."
                  f"{factor * theirs.high * 1e3:.2f}): {v}")
    return summary
