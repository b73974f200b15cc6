"""The backend ``/info`` poller: the measured weight bytes (rho_sys) and model id.

Owns the polling schedule (fast while the backend is down or loading, slow once settled, at most
once a second whatever wakes it) and the last good ``/info`` answer. Must not compute metrics or
touch the request path (a proxied request only wakes it, through :meth:`InfoPoller.wake_if_unsettled`).
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Callable

from aiohttp import ClientSession, ClientTimeout

INFO_MIN_INTERVAL_SECONDS = 1.0          # /info polls: at most one per second, whatever wakes them


class InfoPoller:
    """``interval()``: ``economics.info_poll_seconds`` now (read on every poll: reloadable)."""

    def __init__(self, backend_url: str, interval: Callable[[], float]) -> None:
        self.url = backend_url.rstrip("/") + "/info"
        self.interval = interval
        self.info: dict[str, Any] = {}
        self.settled = False     # the last poll reached a backend that is up
        self.wake: asyncio.Event | None = None   # set: poll /info now (weights unknown)

    def wake_if_unsettled(self) -> None:
        """A request just succeeded: if the backend looked down, poll /info now (the poller
        keeps at least INFO_MIN_INTERVAL_SECONDS between polls whatever the traffic)."""
        if self.wake is not None and not self.settled:
            self.wake.set()

    async def _poll_info(self) -> None:
        """Poll the backend's ``/info`` for ``weight_bytes``: quickly (1 s, doubling up to
        ``info_poll_seconds``) while it is down or still loading, then every ``info_poll_seconds``.

        A backend that answers but has no ``/info`` of ours (vLLM: 404) or reports no weights
        (TGI) is settled: it is polled at the slow interval, and successful requests do not wake
        the poller (they would otherwise cost one ``/info`` request per proxied request)."""
        retry = 1.0
        async with ClientSession(timeout=ClientTimeout(total=5)) as session:
            while True:
                settled = False
                t_poll = time.monotonic()
                try:
                    async with session.get(self.url) as resp:
                        if resp.status == 200:
                            data = await resp.json(content_type=None)
                            if isinstance(data, dict):
                                self.info = data
                                # Ours reports state; other backends (TGI) never report weights.
                                settled = data.get("state") in (None, "ready") or bool(
                                    data.get("weight_bytes"))
                            else:
                                settled = True
                        else:     # up, without an /info of ours; 502-504: a gateway says down
                            settled = resp.status not in (502, 503, 504)
                except Exception:           # backend down or not ours: try again later
                    pass
                self.settled = settled
                slow = self.interval()
                if settled:
                    retry = 1.0
                    delay = slow
                else:
                    delay = min(retry, slow)
                    retry = min(retry * 2, slow)
                wake = self.wake
                assert wake is not None             # (task() creates it)
                wake.clear()
                # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the result when
                # the event is set in the loop turn the task is cancelled (shutdown), losing
                # the cancellation; the poller then kept the proxy's cleanup waiting
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await wake.wait()
                # never more often than this, however often requests wake the poller
                rest = INFO_MIN_INTERVAL_SECONDS - (time.monotonic() - t_poll)
                if rest > 0:
                    await asyncio.sleep(min(rest, delay))

    def task(self) -> asyncio.Task[None]:
        """Start polling (inside the running loop)."""
        self.wake = asyncio.Event()
        return asyncio.create_task(self._poll_info())
