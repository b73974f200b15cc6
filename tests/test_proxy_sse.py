"""SSE framing and token accounting as pure code: arbitrary chunk boundaries, and the no-JSON fast
path agrees with a full JSON parse for any content (quotes, escapes, empty, unicode)."""
from __future__ import annotations

import json

from hypothesis import given, settings, strategies as st

from edge_proxy.proxy.hooks import RequestRecord
from edge_proxy.proxy.sse import SSESplitter, event_data
from edge_proxy.proxy.token_accounting import OpenAIStream, TGIStream

texts = st.one_of(st.just(""), st.just('"content":"x'), st.text(max_size=12))


def _chunk(kind: str, text: str | None, sep: tuple[str, str], usage_null: bool, n_choices: int) -> bytes:
    choices = []
    for i in range(n_choices):
        if kind == "chat":
            delta = {"content": text} if text is not None else {"role": "assistant"}
            choices.append({"index": i, "delta": delta, "finish_reason": None})
        else:
            choices.append({"index": i, "text": text or "", "finish_reason": None, "logprobs": None})
    obj: dict = {"id": "x", "object": "chunk", "choices": choices}
    if usage_null:
        obj["usage"] = None
    return json.dumps(obj, separators=sep).encode()


def _expected_tokens(data: bytes) -> int:
    obj = json.loads(data)
    n = 0
    for ch in obj["choices"]:
        if "delta" in ch:
            n += bool(ch["delta"].get("content"))
        else:
            n += bool(ch.get("text"))
    return n


@given(st.lists(st.tuples(st.sampled_from(["chat", "completion"]), st.one_of(st.none(), texts),
                          st.sampled_from([(",", ":"), (", ", ": ")]), st.booleans(),
                          st.integers(1, 2)), min_size=1, max_size=8),
       st.lists(st.integers(1, 40), max_size=20), st.booleans())
@settings(max_examples=150, deadline=None)
def test_openai_counts_and_framing_any_split(chunks, cuts, strip):
    events = [b"data: " + _chunk(*c) + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]
    stream = b"".join(events)
    rec = RequestRecord(request_id="r", route="/v1/chat/completions", api="openai")
    seen: list[int] = []
    acct = OpenAIStream(rec, strip_usage=strip, sink=lambda n, t: seen.append(n))
    split, out, pos = SSESplitter(), [], 0
    for cut in cuts + [len(stream)]:
        piece, pos = stream[pos:pos + cut], pos + cut
        for ev in split.feed(piece):
            kept = acct.event(ev, event_data(ev), 0)
            if kept is not None:
                out.append(kept)
        if pos >= len(stream):
            break
    rest = stream[pos:]
    for ev in split.feed(rest):
        kept = acct.event(ev, event_data(ev), 0)
        if kept is not None:
            out.append(kept)
    assert split.pending == b""
    assert sum(seen) == sum(_expected_tokens(event_data(e)) for e in events[:-1])
    assert len(out) == len(events)
    if strip:
        for kept, orig in zip(out[:-1], events[:-1]):
            want = json.loads(event_data(orig))
            want.pop("usage", None)                # only the "usage": null we caused is removed
            assert json.loads(event_data(kept)) == want
            assert b'"usage"' not in kept
        assert out[-1] == events[-1]
    else:
        assert out == events
    acct.finish()
    assert rec.output_tokens == sum(seen) and rec.token_count_source == "chunks"


def test_openai_usage_chunk_stripped_and_counts_reconciled():
    rec = RequestRecord(request_id="r", route="/v1/completions", api="openai")
    seen: list[int] = []
    acct = OpenAIStream(rec, strip_usage=True, sink=lambda n, t: seen.append(n))
    a = b'data: {"choices":[{"index":0,"text":"hi","finish_reason":null}],"usage":null}\n\n'
    b = b'data: {"choices":[{"index":0,"text":"","finish_reason":"length"}],"usage":null}\n\n'
    u = b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":3}}\n\n'
    assert acct.event(a, event_data(a), 1) == a.replace(b',"usage":null', b"")
    # the finish_reason chunk waits for the next event (a stripped usage chunk may carry the
    # system_fingerprint the backend would have put on it), then goes out as it came
    assert acct.event(b, event_data(b), 2) is None
    assert acct.event(u, event_data(u), 3) == b.replace(b',"usage":null', b"")
    acct.finish()
    assert (rec.input_tokens, rec.output_tokens, rec.token_count_source) == (4, 3, "backend")
    assert seen == [1, 2] and rec.finish_reason == "length"


def test_tgi_events_and_crlf_framing():
    rec = RequestRecord(request_id="r", route="/generate_stream", api="tgi")
    seen: list[int] = []
    acct = TGIStream(rec, sink=lambda n, t: seen.append(n))
    evs = [b'data:{"token":{"id":1,"text":"a","special":false},"details":null}\r\n\r\n',
           b'data:{"token":{"id":2,"text":"b","special":false},"details":{"finish_reason":"eos_token",'
           b'"generated_tokens":2,"input_length":5}}\r\n\r\n']
    split = SSESplitter()
    got = split.feed(b"".join(evs)[:30]) + split.feed(b"".join(evs)[30:])
    assert got == evs
    for ev in got:
        acct.event(ev, event_data(ev), 0)
    acct.finish()
    assert seen == [1, 1] and rec.output_tokens == 2 and rec.input_tokens == 5
    assert rec.finish_reason == "eos_token"


def test_event_data_multiline():
    assert event_data(b"event: x\ndata: a\ndata: b\n\n") == b"a\nb"
    assert event_data(b": comment\n\n") is None


@given(st.lists(st.binary(min_size=1, max_size=30), max_size=8), st.lists(st.integers(1, 25), max_size=30),
       st.booleans())
@settings(max_examples=150, deadline=None)
def test_relay_dechunks_any_split(payloads, cuts, with_ext):
    """The lean relay's HTTP/1.1 response parser: head + chunked body split at arbitrary points."""
    import asyncio

    from edge_proxy.proxy.raw_http import _BackendProtocol

    loop = asyncio.new_event_loop()
    try:
        proto = _BackendProtocol(loop)
        got: list[bytes] = []
        proto.sink = lambda data, t: got.append(data)
        ext = b";x=1" if with_ext else b""
        body = b"".join(b"%x%b\r\n%b\r\n" % (len(p), ext, p) for p in payloads) + b"0\r\n\r\n"
        wire = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + body)
        pos = 0
        for cut in cuts + [len(wire)]:
            if pos >= len(wire):
                break
            proto.data_received(wire[pos:pos + cut])
            pos += cut
        assert proto.status == 200 and proto.headers["Content-Type"] == "text/event-stream"
        assert b"".join(got) == b"".join(payloads)
        assert proto.done.done() and proto.done.result() == "ok" and proto.keep_alive
    finally:
        loop.close()


@given(st.lists(st.tuples(st.binary(max_size=20).filter(lambda b: b"\n" not in b and b"\r" not in b),
                          st.sampled_from([b"\n\n", b"\r\n\r\n", b"\r\r"])), max_size=8),
       st.lists(st.integers(1, 30), max_size=30))
@settings(max_examples=200, deadline=None)
def test_splitter_any_split_any_terminator(events, cuts):
    """Split anywhere (a terminator across feeds included): the same events as one feed."""
    stream = b"".join(b"data: " + body + end for body, end in events)
    whole = SSESplitter()
    expected = whole.feed(stream)
    sp, got, pos = SSESplitter(max_event_bytes=4096), [], 0
    for c in cuts + [len(stream)]:
        got += sp.feed(stream[pos:pos + c])
        pos += c
    assert got == expected and sp.pending == whole.pending


def test_splitter_bounds_an_unterminated_event():
    import pytest

    from edge_proxy.proxy.sse import EventTooLarge

    sp = SSESplitter(max_event_bytes=100)
    assert sp.feed(b"data: a\n\ndata: " + b"x" * 50) == [b"data: a\n\n"]
    with pytest.raises(EventTooLarge) as err:
        sp.feed(b"y" * 60)
    assert err.value.events == [] and sp.pending == b""
    with pytest.raises(EventTooLarge) as err:
        SSESplitter(max_event_bytes=10).feed(b"data: ok\n\n" + b"z" * 11)
    assert err.value.events == [b"data: ok\n\n"]
