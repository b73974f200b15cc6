"""Incremental Server-Sent Events framing: split a byte stream into whole events, read their data.

Only framing is done here (no JSON): events end with a blank line (``\\n\\n``, ``\\r\\n\\r\\n`` or
``\\r\\r``); an event's data is its ``data:`` lines joined by ``\\n`` (WHATWG HTML, SSE section).
"""
from __future__ import annotations

import re

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class SSESplitter:
    """Feed raw bytes as they arrive; get back the complete events (raw bytes, terminator included)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data if self._buf else data
        events: list[bytes] = []
        start = 0
        # Fast path for the common "\n\n" framing.
        if b"\r" not in buf:
            while True:
                i = buf.find(b"\n\n", start)
                if i < 0:
                    break
                events.append(buf[start : i + 2])
                start = i + 2
        else:
            for m in _EVENT_END.finditer(buf):
                events.append(buf[start : m.end()])
                start = m.end()
        self._buf = buf[start:]
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
