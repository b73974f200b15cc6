"""JSON from outside the process (client request bodies, backend responses): parsed without ever
raising anything but ``ValueError``.

``json.loads`` raises ``RecursionError`` on arrays or objects nested about 1,000 deep (a 2 KB
body): caught here and turned into ``ValueError``, so every caller's "not valid JSON" path (400 in
the API's format) covers it and no stack trace reaches a client or the log.
"""
from __future__ import annotations

import json
from typing import Any


def loads(data: bytes | str) -> Any:
    """``json.loads`` that raises ``ValueError`` (never ``RecursionError``) on bad input."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
