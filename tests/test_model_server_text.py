"""Stop-sequence matching and incremental detokenization (pure functions, property-based)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model_server.text import IncrementalDetokenizer, StopMatcher

ALPHABET = "ab\u00e9\u4e2d\U0001F600 \n"


def _reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text before the stop occurrence that completes first (smallest end, then smallest start),
    as a generator that checks after every character would stop; and whether one occurred."""
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s and text.find(s) >= 0]
    return (text[:min(hits)[1]], True) if hits else (text, False)


def test_stop_that_completes_first_wins_whatever_the_chunking():
    # "a" completes at index 2, the longer stop that starts earlier only at index 3
    for chunks in (["\U0001F600", "a", "\U0001F600"], ["\U0001F600a\U0001F600"]):
        m = StopMatcher(["a", "\U0001F600a\U0001F600"])
        out = ""
        for c in chunks:
            safe, stopped = m.push(c)
            out += safe
            if stopped:
                break
        assert (out, stopped, m.matched) == ("\U0001F600", True, "a")


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.text(alphabet=ALPHABET, max_size=4), max_size=12),
       stops=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=3), max_size=3))
def test_stop_matcher_equals_reference(chunks, stops):
    m = StopMatcher(stops)
    out, stopped = "", False
    for c in chunks:
        safe, stopped = m.push(c)
        out += safe
        if stopped:
            break
    if not stopped:
        out += m.flush()
    expected, expected_stop = _reference("".join(chunks), stops)
    assert stopped == expected_stop
    assert out == expected


def test_stop_matcher_holds_back_possible_prefix():
    m = StopMatcher(["END"])
    assert m.push("abcE") == ("abc", False)        # "E" might start "END"
    assert m.push("N") == ("", False)
    assert m.push("D tail") == ("", True)
    assert m.matched == "END"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=ALPHABET + "xyz_(){}:=.", min_size=1, max_size=40))
def test_incremental_detokenizer_reassembles_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    d = IncrementalDetokenizer(tokenizer)
    pieces = [d.add(t) for t in ids]
    pieces.append(d.flush())
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)   # multi-byte characters never split
