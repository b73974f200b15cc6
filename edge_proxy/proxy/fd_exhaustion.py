"""Running out of file descriptors is the proxy's own fault, not a backend outage.

When the process has no descriptor left (``EMFILE``: its ``RLIMIT_NOFILE``; ``ENFILE``: the
system's table), connecting to the backend fails with an ``OSError`` that aiohttp wraps as a
connect error: without this module it was answered 502 "backend unreachable", counted as an
upstream connect error (1,000 streams at a soft limit of 1024: 99.9% of requests) and logged
nowhere. Here it is recognised (:func:`is_fd_exhaustion`), answered **503** with error type
``fd_exhausted`` in the client's format, counted in
``edge_proxy_process_errors_total{type="fd_exhausted"}`` and logged as one WARNING line naming the
limit (at most one per :data:`LOG_INTERVAL_SECONDS`, with the count held back). The cold-start gate
is not told: the backend is fine.
"""
from __future__ import annotations

import errno
import logging
import resource
import time

from aiohttp import web
from prometheus_client import Counter

from edge_proxy.proxy.errors import Api, error_response

log = logging.getLogger("edge_proxy")

ERROR_TYPE = "fd_exhausted"
STATUS = 503
LOG_INTERVAL_SECONDS = 10.0
_ERRNOS = (errno.EMFILE, errno.ENFILE)


def is_fd_exhaustion(exc: BaseException | None) -> bool:
    """True when ``exc`` (or what it wraps: ``os_error``, the cause or context chain) is EMFILE/ENFILE."""
    return _errno_of(exc) is not None


def nofile_limits() -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE of this process."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class FdExhaustion:
    """Counts, logs (rate-limited) and answers fd exhaustion; one per proxy (holds the log's state)."""

    def __init__(self, counter: Counter, interval_s: float = LOG_INTERVAL_SECONDS) -> None:
        self._count = counter.labels(ERROR_TYPE)
        self.interval_s = interval_s
        self._next_log = 0.0          # monotonic seconds
        self._held = 0

    def record(self, exc: BaseException) -> str:
        """Count and log one occurrence; returns the message for the client."""
        self._count.inc()
        soft, hard = nofile_limits()
        name = "ENFILE (system file table full)" if _errno_of(exc) == errno.ENFILE else "EMFILE"
        msg = (f"proxy out of file descriptors ({name}; RLIMIT_NOFILE soft {soft}, hard {hard}): "
               "try again later")
        now = time.monotonic()
        if now >= self._next_log:
            held, self._held = self._held, 0
            self._next_log = now + self.interval_s
            more = f"; {held} more since the last line" if held else ""
            log.warning("out of file descriptors connecting to the backend (%s, RLIMIT_NOFILE soft %s, "
                        "hard %s): answered %d; raise the limit (ulimit -n, LimitNOFILE=)%s",
                        name, soft, hard, STATUS, more)
        else:
            self._held += 1
        return msg

    def response(self, api: Api, exc: BaseException) -> web.Response:
        return error_response(api, STATUS, ERROR_TYPE, self.record(exc))


def _errno_of(exc: BaseException | None) -> int | None:
    """EMFILE/ENFILE found in ``exc``, its ``os_error`` (aiohttp.ClientConnectorError) or its chain."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for e in (exc, getattr(exc, "os_error", None)):
            if isinstance(e, OSError) and e.errno in _ERRNOS:
                return e.errno
        exc = exc.__cause__ or exc.__context__
    return None
