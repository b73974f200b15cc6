"""Remote source: poll a model server's ``GET /energy`` (split deployments, GPU on another host).

The server answers with its recent counter samples stamped by ITS monotonic clock, plus its
current ``now_monotonic_seconds``. Monotonic clocks of two processes share no origin, so each poll
estimates the offset between the clocks (NTP-style, midpoint of the request)::

    offset_ns = (t_send_ns + t_recv_ns) / 2 - now_server_ns      # local = server + offset

and keeps the estimate from the poll with the smallest round trip among the last 16 (its error is
bounded by half that round trip). A sample stamped ``t_server`` becomes local time
``t_server + offset``.

A restart of the server (a new process, or the pod moved to another node: scale-to-zero's cold
start) makes its clock, its sample times and its GPUs unrelated to the ones seen so far. The reader
detects it (``instance_id`` in the answer changed, or, from a server that does not send one, the
GPU set changed or the server clock went back) and starts over: offsets, last server time and GPU
list are dropped and the answer is fetched again without ``since``. ``restarts_total`` counts them.
"""
from __future__ import annotations

import json
import time
import urllib.error
import logging
import urllib.request
from collections import deque

from edge_proxy.energy.readings import Reading, ReaderError

log = logging.getLogger(__name__)


def clock_offset_ns(t_send_ns: int, t_recv_ns: int, server_now_ns: int) -> int:
    """offset = (t_send + t_recv)/2 - t_server_now (ns): add it to a server time to get local time."""
    return (t_send_ns + t_recv_ns) // 2 - server_now_ns


class RemoteReader:
    source = "remote"

    def __init__(self, base_url: str, gpu_uuids: list[str] | None = None, timeout_seconds: float = 2.0) -> None:
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise ReaderError(f"remote energy source needs an http(s) URL, got {base_url!r}")
        self.url = base_url.rstrip("/")
        if not self.url.endswith("/energy"):
            self.url += "/energy"
        self.timeout = timeout_seconds
        self._want = list(gpu_uuids or [])
        self.gpu_uuids = list(self._want)
        self._offsets: deque[tuple[int, int]] = deque(maxlen=16)   # (rtt_ns, offset_ns)
        self._last_server_t: float | None = None
        self._instance: str | None = None                # the server's instance_id last seen
        self._server_gpus: frozenset[str] | None = None  # the GPU set it last listed
        self.restarts_total = 0

    @property
    def offset_ns(self) -> int | None:
        return min(self._offsets)[1] if self._offsets else None

    def _get(self) -> tuple[dict, int, int]:
        url = self.url
        if self._last_server_t is not None:
            url += f"?since={self._last_server_t!r}"
        t_send = time.monotonic_ns()
        with urllib.request.urlopen(url, timeout=self.timeout) as resp:   # noqa: S310 (configured URL)
            body = resp.read()
        t_recv = time.monotonic_ns()
        return json.loads(body), t_send, t_recv

    def _restarted(self, data: dict) -> str | None:
        """Why this answer comes from another server run than the last one (None: same run)."""
        instance = data.get("instance_id")
        gpus = frozenset(str(g.get("uuid")) for g in data.get("gpus") or [] if isinstance(g, dict))
        why = None
        if instance is not None and self._instance is not None and instance != self._instance:
            why = "instance_id changed"
        elif gpus and self._server_gpus and gpus != self._server_gpus:
            why = f"GPUs changed ({sorted(self._server_gpus)} -> {sorted(gpus)})"
        else:
            try:
                now = float(data["now_monotonic_seconds"])
            except (KeyError, TypeError, ValueError):
                now = None
            if now is not None and self._last_server_t is not None and now < self._last_server_t:
                why = f"server clock went back ({self._last_server_t:.1f} s -> {now:.1f} s)"
        if instance is not None:
            self._instance = str(instance)
        if gpus:
            self._server_gpus = gpus
        return why

    def _reset(self, why: str) -> None:
        self.restarts_total += 1
        log.warning("remote energy source %s restarted (%s): clock offsets, last sample time and GPU "
                    "list reset", self.url, why)
        self._offsets.clear()
        self._last_server_t = None
        self.gpu_uuids = list(self._want)

    def read(self) -> list[Reading]:
        try:
            data, t_send, t_recv = self._get()
            why = self._restarted(data)
            if why is not None:
                self._reset(why)
                data, t_send, t_recv = self._get()      # again, without the old run's ``since``
                self._restarted(data)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return [Reading(t_ns=time.monotonic_ns(), error=f"GET {self.url}: {exc}")]
        if data.get("source") in (None, "none"):
            return [Reading(t_ns=t_recv, error=f"{self.url} reports source {data.get('source')!r} (no GPU counter)")]
        try:
            now_server_ns = int(round(float(data["now_monotonic_seconds"]) * 1e9))
            samples = data.get("samples") or []
            power = {str(g["uuid"]): float(g["power_watts"]) for g in data.get("gpus") or []
                     if g.get("power_watts") is not None}
        except (KeyError, TypeError, ValueError) as exc:
            return [Reading(t_ns=t_recv, error=f"{self.url}: malformed /energy answer ({exc})")]
        self._offsets.append((t_recv - t_send, clock_offset_ns(t_send, t_recv, now_server_ns)))
        offset = self.offset_ns
        assert offset is not None
        out: list[Reading] = []
        for s in samples:
            try:
                ts = float(s["t_monotonic_seconds"])
                energy = {str(k): int(v) for k, v in s["energy_millijoules"].items()}
            except (KeyError, TypeError, ValueError, AttributeError):
                continue
            if self._last_server_t is not None and ts <= self._last_server_t:
                continue
            if self._want:
                energy = {u: v for u, v in energy.items() if u in self._want}
            if not self.gpu_uuids:
                self.gpu_uuids = sorted(energy)
            self._last_server_t = ts
            out.append(Reading(t_ns=int(round(ts * 1e9)) + offset, energy_mj=energy,
                               power_w={u: p for u, p in power.items() if u in energy}))
        return out

    def close(self) -> None:
        return None
