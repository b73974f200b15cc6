"""The logger aiohttp's connection handler uses: a client's malformed HTTP is one rate-limited line.

aiohttp logs every protocol-level 400 (a header over 8 KiB, a bad Content-Length, garbage on the
port) as ``ERROR ... Error handling request`` with a multi-line traceback, and so does a write to a
client that already went away. Neither is a fault of the server: a protocol error becomes one INFO
line (the error's first line, at most one per ``interval_s``, with a count of the lines held back),
a disconnect one DEBUG line. Anything else keeps aiohttp's ERROR line with its traceback.
Standard library and aiohttp only.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

RATE_INTERVAL_SECONDS = 10.0


def one_line(exc: BaseException, limit: int = 160) -> str:
    """``Type: message`` on one line (aiohttp's messages span lines), at most ``limit`` characters,
    without the bytes aiohttp quotes from the request (a header's value may be a credential)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    for quote in ("b'", 'b"', "bytearray("):
        cut = text.find(quote)
        if cut >= 0:
            text = text[:cut].rstrip(" :") + " [request bytes not logged]"
    return text if len(text) <= limit else text[:limit - 3] + "..."


class ProtocolErrorLogger(logging.LoggerAdapter):
    """Pass as ``AppRunner(app, logger=ProtocolErrorLogger(...))``; aiohttp calls ``.exception``."""

    def __init__(self, logger: logging.Logger, interval_s: float = RATE_INTERVAL_SECONDS) -> None:
        super().__init__(logger, {})
        self.interval_s = interval_s
        self._next_at = 0.0          # monotonic seconds: the next protocol-error line may go out then
        self._held = 0               # lines held back since the last one

    def exception(self, msg: Any, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else None
        if isinstance(exc, ConnectionError):
            self.logger.debug("client went away: %s", one_line(exc))
            return
        if isinstance(exc, HttpProcessingError):
            now = time.monotonic()
            if now < self._next_at:
                self._held += 1
                return
            held, self._held = self._held, 0
            self._next_at = now + self.interval_s
            more = f" ({held} more in the last {self.interval_s:.0f} s not logged)" if held else ""
            self.logger.info("bad HTTP request answered %s: %s%s", getattr(exc, "code", 400),
                             one_line(exc), more)
            return
        self.logger.error(msg, *args, exc_info=exc_info, **kwargs)
