"""Incremental Server-Sent Events framing: split a byte stream into whole events, read their data.

Only framing is done here (no JSON): events end with a blank line (``\\n\\n``, ``\\r\\n\\r\\n`` or
``\\r\\r``); an event's data is its ``data:`` lines joined by ``\\n`` (WHATWG HTML, SSE section).
"""
from __future__ import annotations

import re

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class EventTooLarge(ValueError):
    """The stream's pending (unterminated) event grew over the splitter's bound. ``events``: the
    complete events of the same feed, before it (still to be relayed)."""

    def __init__(self, message: str, events: list[bytes]) -> None:
        super().__init__(message)
        self.events = events
        self.kept: bytes | None = None     # set by the relay: those events' bytes for the client


class SSESplitter:
    """Feed raw bytes as they arrive; get back the complete events (raw bytes, terminator included).

    ``max_event_bytes`` bounds the bytes of an event still waiting for its terminator: past it,
    :meth:`feed` drops them and raises :class:`EventTooLarge` (a backend that sends one endless
    line must not make the proxy buffer it whole). None or 0: no bound."""

    __slots__ = ("_buf", "_max")

    def __init__(self, max_event_bytes: int | None = None) -> None:
        self._buf = b""
        self._max = max_event_bytes or 0

    def feed(self, data: bytes) -> list[bytes]:
        old = len(self._buf)
        buf = self._buf + data if old else data
        events: list[bytes] = []
        start = 0
        # Fast path for the common "\n\n" framing. The buffered bytes hold no terminator, so
        # the search starts where a terminator reaching into the new bytes could begin.
        if b"\r" not in buf:
            pos = max(old - 1, 0)
            while True:
                i = buf.find(b"\n\n", pos)
                if i < 0:
                    break
                events.append(buf[start : i + 2])
                start = pos = i + 2
        else:
            for m in _EVENT_END.finditer(buf, max(old - 3, 0)):
                events.append(buf[start : m.end()])
                start = m.end()
        self._buf = buf[start:]
        if self._max and len(self._buf) > self._max:
            self._buf = b""
            raise EventTooLarge(f"backend sent an SSE event over {self._max} bytes without its end",
                                events)
        return events

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet terminated (flushed as-is at the end of the stream)."""
        return self._buf


def event_data(event: bytes) -> bytes | None:
    """The data of one event (``data:`` lines joined by newline), or None if it has none."""
    if event.startswith(b"data:") and event.count(b"\n") <= 2 and b"\r" not in event:
        data = event[5:].rstrip(b"\n")
        if b"\n" not in data:
            return data[1:] if data.startswith(b" ") else data
    parts: list[bytes] = []
    for line in event.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
        elif line == b"data":
            parts.append(b"")
    if not parts:
        return None
    return b"\n".join(parts)
