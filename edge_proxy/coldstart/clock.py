"""Clock conversions between the backend's epoch timestamps and the proxy's monotonic clock.

The model server reports its start-up timeline (``/info`` ``startup``) as epoch seconds (floats);
the proxy measures intervals with ``time.monotonic_ns()``. To put both on one axis we read the two
clocks back to back and shift: ``t_mono = t_epoch - (wall_now - mono_now)``. This is exact when
both processes share a host (the local supervisor); across hosts it carries the hosts' clock skew.
"""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class ClockPair:
    """One simultaneous reading of the wall clock and the monotonic clock (both in ns)."""

    wall_ns: int
    mono_ns: int

    @classmethod
    def now(cls) -> "ClockPair":
        """Read the wall clock between two monotonic reads and use their midpoint.

        The bracket keeps the pairing error below the (sub-microsecond) gap between the reads.
        """
        m0 = time.monotonic_ns()
        w = time.time_ns()
        m1 = time.monotonic_ns()
        return cls(wall_ns=w, mono_ns=(m0 + m1) // 2)


def epoch_to_monotonic_ns(epoch_seconds: float, pair: ClockPair) -> int:
    """Monotonic ns of an epoch timestamp: ``mono = pair.mono_ns + (epoch_s - pair.wall_ns/1e9)·1e9``.

    The subtraction is done in seconds on two floats of the same magnitude first, so the result
    keeps sub-microsecond precision (an epoch float has ~0.24 µs resolution today); converting the
    epoch float to integer ns first would not lose more, but the order here makes the intent plain.
    """
    delta_s = float(epoch_seconds) - pair.wall_ns / 1e9
    return pair.mono_ns + round(delta_s * 1e9)


def monotonic_to_epoch_ns(mono_ns: int, pair: ClockPair) -> int:
    """Epoch ns of a monotonic timestamp (for OTel span times): ``wall = pair.wall_ns + (mono - pair.mono_ns)``."""
    return pair.wall_ns + (int(mono_ns) - pair.mono_ns)
