"""Incremental detokenization and stop-sequence matching for streamed tokens.

Both run in the HTTP layer (engines produce token ids only).
"""
from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas without splitting multi-byte characters.

    The prefix/read-offset method (as in TGI and vLLM): decode a small window of recent tokens and
    emit only what it adds beyond the already-read part; hold back while the window ends in an
    incomplete UTF-8 sequence (U+FFFD).
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        # the Rust tokenizer's own decode skips transformers' Python wrapper (~4x less per call)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend_decode = getattr(backend, "decode", None)
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self._prefix_text: str | None = ""   # decode of ids[prefix_offset:read_offset]; None: not yet

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._backend_decode is not None:
            return self._backend_decode(ids, skip_special_tokens=self.skip_special)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; return the new text it completes (may be empty)."""
        self.ids.append(int(token_id))
        # (not the tokenizer's decode_batch: it hands work to a thread pool, ~5x dearer per call here)
        prefix_text = self._prefix_text
        if prefix_text is None:
            prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self._prefix_text = prefix_text      # unchanged until the offsets move: decoded once, not per token
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self._prefix_text = None
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        self._prefix_text = ""
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""


class StopMatcher:
    """Finds the first stop string in streamed text; holds back text that could begin one.

    ``push(delta)`` returns ``(safe_text, stopped)``: ``safe_text`` can be sent now; when ``stopped``
    it is the text up to (not including) the stop string and generation must end.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.matched: str | None = None

    def push(self, delta: str) -> tuple[str, bool]:
        if not self.stops:
            return delta, False
        self.pending += delta
        # The stop that completes first wins (smallest end; on a tie the one that starts first), as it
        # would if the text arrived one character at a time: the result does not depend on chunking.
        first = None
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0 and (first is None or (i + len(s), i) < (first[0] + len(first[1]), first[0])):
                first = (i, s)
        if first is not None:
            out = self.pending[:first[0]]
            self.matched = first[1]
            self.pending = ""
            return out, True
        # keep the longest tail that is a proper prefix of some stop string
        keep = 0
        for k in range(min(self.hold, len(self.pending)), 0, -1):
            tail = self.pending[-k:]
            if any(s.startswith(tail) for s in self.stops):
                keep = k
                break
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
