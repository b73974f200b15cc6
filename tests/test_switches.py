"""model_server.switches: MODEL_SERVER_* switches parse strictly, and a bad one is a serve error that --engine auto
never takes for "this engine cannot serve the model" (no fallback)."""
from __future__ import annotations

import pytest

from model_server import switches


@pytest.mark.parametrize("raw,want", [("", None), (" ", None), ("0", False), ("1", True), (" 1 ", True)])
def test_flag(monkeypatch, raw, want):
    monkeypatch.setenv("MODEL_SERVER_TEST_FLAG", raw)
    assert switches.flag("MODEL_SERVER_TEST_FLAG") is want


@pytest.mark.parametrize("raw,want", [("", None), ("0", 0), ("12", 12), ("-3", -3)])
def test_integer(monkeypatch, raw, want):
    monkeypatch.setenv("MODEL_SERVER_TEST_INT", raw)
    assert switches.integer("MODEL_SERVER_TEST_INT") == want


@pytest.mark.parametrize("raw,want", [("", None), ("0", 0.0), ("0.5", 0.5), ("1e-5", 1e-5), (" 10 ", 10.0)])
def test_seconds(monkeypatch, raw, want):
    monkeypatch.setenv("MODEL_SERVER_TEST_S", raw)
    assert switches.seconds("MODEL_SERVER_TEST_S") == want


@pytest.mark.parametrize("raw,want", [("", "a"), (" ", "a"), ("a", "a"), (" b ", "b")])
def test_choice(monkeypatch, raw, want):
    monkeypatch.setenv("MODEL_SERVER_TEST_CHOICE", raw)
    assert switches.choice("MODEL_SERVER_TEST_CHOICE", ("a", "b")) == want


def _choice_ab(name: str) -> str:
    return switches.choice(name, ("a", "b"))


@pytest.mark.parametrize("reader,raw", [(_choice_ab, "c"), (_choice_ab, "A"), (switches.flag, "yes"), (switches.flag, "2"), (switches.integer, "1.5"),
                                        (switches.integer, "four"), (switches.seconds, "-1"), (switches.seconds, "nan"),
                                        (switches.seconds, "inf"), (switches.seconds, "soon")])
def test_bad_values_name_the_switch_in_one_line(monkeypatch, reader, raw):
    monkeypatch.setenv("MODEL_SERVER_TEST_X", raw)
    with pytest.raises(switches.SwitchValueError, match=r"^MODEL_SERVER_TEST_X must be .*, got") as err:
        reader("MODEL_SERVER_TEST_X")
    assert "\n" not in str(err.value)


def test_a_bad_integer_switch_is_not_a_fallback(tiny_model_dir, monkeypatch):
    from model_server.loading import load_model
    from model_server.server import SwitchError, create_engine

    monkeypatch.setenv("MODEL_SERVER_FAST_MIXED_SEGMENTS", "many")
    with pytest.raises(SwitchError, match="MODEL_SERVER_FAST_MIXED_SEGMENTS must be an integer"):
        create_engine("fast", load_model(tiny_model_dir, "cpu", "none", True), 2, 64)


def test_prefill_graph_tokens_switch_sets_the_prefill_buckets(tiny_model_dir, monkeypatch):
    """MODEL_SERVER_FAST_PREFILL_GRAPH_TOKENS: prefill passes of up to that many padded tokens are graphed (a burst
    of 64 prompts of 64 tokens fits one bucket at the default 4096, not at 2048); below 16 or not an integer, a
    one-line serve error."""
    from model_server.engines.fast.factory import from_loaded
    from model_server.loading import load_model
    from model_server.server import SwitchError, create_engine

    loaded = load_model(tiny_model_dir, "cpu", "none", True)
    buckets = {}
    for raw in ("", "2048"):
        monkeypatch.setenv("MODEL_SERVER_FAST_PREFILL_GRAPH_TOKENS", raw)
        eng = from_loaded(loaded, max_batch=64, max_total_tokens=256, bucketed_prefill=True)
        buckets[raw] = eng.runner.prefill_buckets
    assert max(n * t for n, t in buckets[""]) == 4096 and (64, 64) in buckets[""]           # the default
    assert max(n * t for n, t in buckets["2048"]) == 2048 and (64, 64) not in buckets["2048"]
    for bad, says in (("8", "a token count >= 16"), ("lots", "an integer")):
        monkeypatch.setenv("MODEL_SERVER_FAST_PREFILL_GRAPH_TOKENS", bad)
        with pytest.raises(SwitchError, match=f"MODEL_SERVER_FAST_PREFILL_GRAPH_TOKENS must be {says}"):
            create_engine("fast", loaded, 2, 64)


def test_max_prefill_tokens_switch_splits_a_lone_burst(tiny_model_dir, monkeypatch):
    """MODEL_SERVER_FAST_MAX_PREFILL_TOKENS: a burst that arrives while nothing decodes is prefilled in passes of at
    most that many padded tokens (8 prompts of 16 tokens: one pass by default, more under a 64-token budget); below
    16 or not an integer, a one-line serve error."""
    import asyncio

    from model_server.engines.base import GenerationRequest, SamplingParams
    from model_server.engines.fast.factory import from_loaded
    from model_server.loading import load_model
    from model_server.server import SwitchError, create_engine

    loaded = load_model(tiny_model_dir, "cpu", "none", True)

    async def burst(eng) -> int:
        await eng.start()
        try:
            async def one(i: int) -> None:
                req = GenerationRequest(f"b{i}", [5 + i] * 16, SamplingParams(max_new_tokens=1, ignore_eos=True))
                async for _ in eng.submit(req):
                    pass
            await asyncio.gather(*(one(i) for i in range(8)))
            return eng.stats().prefill_calls_total
        finally:
            await eng.stop()

    passes = {}
    for raw in ("", "64"):
        monkeypatch.setenv("MODEL_SERVER_FAST_MAX_PREFILL_TOKENS", raw)
        eng = from_loaded(loaded, max_batch=8, max_total_tokens=32)
        assert eng.max_prefill_tokens == (64 if raw else 8192)
        passes[raw] = asyncio.run(burst(eng))
    assert passes[""] == 1 and passes["64"] >= 2, passes
    for bad, says in (("8", "a token count >= 16"), ("lots", "an integer")):
        monkeypatch.setenv("MODEL_SERVER_FAST_MAX_PREFILL_TOKENS", bad)
        with pytest.raises(SwitchError, match=f"MODEL_SERVER_FAST_MAX_PREFILL_TOKENS must be {says}"):
            create_engine("fast", loaded, 2, 64)
