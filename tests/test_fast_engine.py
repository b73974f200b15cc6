"""The fast engine on CPU (fp32, tiny random Llama and Qwen2 models from tests/fast_engine_support.py).

Greedy outputs must be token-identical to ``model.generate`` across mixed prompt lengths, staggered
arrivals, queueing beyond the slot count and cancellations; seeded sampling must reproduce; cancel
must free the slot. The models, references and engine helpers are in tests/fast_engine_support.py.
"""
from __future__ import annotations

import asyncio
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model_server.engines.base import GenerationRequest, SamplingParams  # noqa: E402
from model_server.engines.fast import FastEngine, UnsupportedModel  # noqa: E402

from tests.fast_engine_support import EOS, _collect, _engine, _prompts, _reference, _tiny  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    return _tiny("llama")


@pytest.fixture(scope="module")
def qwen2():
    return _tiny("qwen2", seed=1)


# (segments, tokens) of prompts prefilled inside decode steps (.mixed); 0 segments: a prefill pass each
# (segments, tokens, min segments): "fill" waits (at most 10 ms) until arrivals fill 3 segments
MIXED = {"pass": (0, 64, 1), "mixed": (4, 64, 1), "short-segments": (4, 8, 1), "fill": (4, 64, 3)}


@pytest.mark.parametrize("arch,bucketed,mixed", [("llama", False, "pass"), ("qwen2", False, "mixed"),
                                                 ("llama", True, "mixed"), ("qwen2", True, "pass"),
                                                 ("llama", False, "short-segments"),
                                                 ("qwen2", False, "short-segments"), ("llama", False, "fill")])
def test_greedy_identical_to_generate(arch, bucketed, mixed, llama, qwen2):
    """``bucketed``: prompts padded to prefill buckets (what runs as CUDA graphs on a GPU), padding rows
    writing into the scratch slot; run eagerly here, so the padding itself is what is tested. ``mixed``:
    requests arriving while others decode are prefilled inside the decode step, as prompt segments
    (``short-segments``: 8 tokens each, so a prompt spans up to 4 segments of one step)."""
    model = llama if arch == "llama" else qwen2
    rng = random.Random(7)
    prompts = _prompts(rng, 9, 1, 30)
    news = [rng.randint(1, 24) for _ in prompts]
    refs = [_reference(model, p, n) for p, n in zip(prompts, news)]

    async def main():
        # cap 256 holds every pass here (<= 4 rows x 32 padded tokens), so however the arrivals bunch (a loaded host
        # runs them together) each pass is bucketed; the first arrival finds the engine idle and always gets a pass
        kw = dict(bucketed_prefill=True, prefill_graph_tokens=256) if bucketed else {}
        seg, tok, fill = MIXED[mixed]
        eng = _engine(model, max_prefill_tokens=64, mixed_segments=seg, mixed_tokens=tok, mixed_min_segments=fill,
                      **kw)   # 9 requests > 4 slots: queueing + split prefill
        await eng.start()
        try:
            tasks = [_collect(eng, GenerationRequest(f"r{i}", p, SamplingParams(max_new_tokens=n)),
                              delay=0.002 * rng.randint(0, 20))
                     for i, (p, n) in enumerate(zip(prompts, news))]
            return await asyncio.gather(*tasks), eng.stats()
        finally:
            await eng.stop()

    results, stats = asyncio.run(main())
    for (toks, reason), ref, n in zip(results, refs, news):
        assert toks == ref
        assert reason == ("eos_token" if ref and ref[-1] == EOS and len(ref) <= n else "length")
    assert stats.running_requests == 0
    assert stats.decode_tokens_total + 9 == sum(len(r) for r in refs)
    if bucketed:
        assert stats.extra["prefill_calls_bucketed"] > 0 and stats.extra["prefill_calls_eager"] == 0
    else:
        assert stats.extra["prefill_calls_bucketed"] == 0 and stats.extra["prefill_calls_eager"] > 0
    in_steps = stats.extra["prefills_in_decode_steps"]
    if mixed == "pass":
        assert in_steps == 0
        assert 2 <= stats.prefill_calls_total <= 9      # 9 requests, 4 slots: at least two prefill passes
    else:
        assert in_steps >= 1 and stats.prefill_calls_total >= 1
        assert stats.prefill_calls_total + in_steps <= 9
    assert stats.prefill_tokens_total == sum(len(p) for p in prompts)


@pytest.mark.parametrize("mixed", [0, 4])
def test_cancellations_keep_others_identical(llama, mixed):
    rng = random.Random(3)
    prompts = _prompts(rng, 6, 2, 20)
    n = 20
    refs = [_reference(llama, p, n, ignore_eos=True) for p in prompts]

    async def main():
        eng = _engine(llama, mixed_segments=mixed)
        await eng.start()
        try:
            tasks = []
            for i, p in enumerate(prompts):
                req = GenerationRequest(f"c{i}", p, SamplingParams(max_new_tokens=n, ignore_eos=True))
                tasks.append(_collect(eng, req, delay=0.003 * i, cancel_after=3 if i % 2 else None))
            res = await asyncio.gather(*tasks)
            # a consumer that simply stops reading (aclose) also cancels
            it = eng.submit(GenerationRequest("closed", prompts[0], SamplingParams(max_new_tokens=n, ignore_eos=True)))
            await it.__anext__()
            await it.aclose()
            for _ in range(200):
                if eng.stats().running_requests == 0:
                    break
                await asyncio.sleep(0.01)
            return res, eng.stats()
        finally:
            await eng.stop()

    res, stats = asyncio.run(main())
    for i, ((toks, reason), ref) in enumerate(zip(res, refs)):
        if i % 2:
            assert reason == "cancelled"
            assert 3 <= len(toks) < n and toks == ref[: len(toks)]
        else:
            assert reason == "length" and toks == ref
    assert stats.running_requests == 0
    assert stats.extra["free_slots"] == 4


@pytest.mark.parametrize("overlap,mixed", [(True, 0), (False, 0), (True, 4)])
def test_requests_that_end_at_their_first_token(llama, overlap, mixed):
    """A prefill's first tokens are read after the next decode step is already launched with those rows:
    a request that ends at its first token (one token asked for, or EOS) gets exactly that token, the
    decode row launched for it is dropped, its slot is freed, and the requests decoding beside it are
    unchanged."""
    rng = random.Random(11)
    longs = _prompts(rng, 3, 3, 12)
    shorts = _prompts(rng, 6, 2, 10)
    long_refs = [_reference(llama, p, 24) for p in longs]
    short_refs = [_reference(llama, p, 1) for p in shorts]

    async def main():
        eng = _engine(llama, overlap_prefill=overlap, mixed_segments=mixed)   # 4 slots: 3 long ones decode, short ones come and go
        await eng.start()
        try:
            tasks = [_collect(eng, GenerationRequest(f"l{i}", p, SamplingParams(max_new_tokens=24)))
                     for i, p in enumerate(longs)]
            tasks += [_collect(eng, GenerationRequest(f"s{i}", p, SamplingParams(max_new_tokens=1)),
                               delay=0.003 * (i + 1)) for i, p in enumerate(shorts)]
            return await asyncio.gather(*tasks), eng.stats()
        finally:
            await eng.stop()

    results, stats = asyncio.run(main())
    for (toks, reason), ref in zip(results[:3], long_refs):
        assert toks == ref and reason == ("eos_token" if ref[-1] == EOS and len(ref) <= 24 else "length")
    for (toks, reason), ref in zip(results[3:], short_refs):
        assert toks == ref and len(toks) == 1
        assert reason == ("eos_token" if ref[0] == EOS else "length")
    assert stats.running_requests == 0 and stats.extra["free_slots"] == 4
    assert stats.decode_tokens_total == sum(len(r) - 1 for r in long_refs)   # dropped rows are not counted
    if mixed:
        assert stats.extra["prefills_in_decode_steps"] >= 1


def test_cancel_frees_the_slot(llama):
    async def main():
        eng = _engine(llama, max_batch=1)
        await eng.start()
        try:
            long_req = GenerationRequest("long", [5, 6, 7], SamplingParams(max_new_tokens=60, ignore_eos=True))
            queued = GenerationRequest("queued", [8, 9], SamplingParams(max_new_tokens=5, ignore_eos=True))
            it = eng.submit(long_req)
            first = await it.__anext__()
            q_task = asyncio.ensure_future(_collect(eng, queued))
            await asyncio.sleep(0.01)
            assert eng.stats().waiting_requests == 1     # only one slot: it waits
            eng.cancel("long")
            rest = [ev async for ev in it]
            toks, reason = await asyncio.wait_for(q_task, 30)
            return first, rest, toks, reason, eng.stats()
        finally:
            await eng.stop()

    first, rest, toks, reason, stats = asyncio.run(main())
    assert first.token_id is not None
    assert rest[-1].finish_reason == "cancelled"
    assert len(rest) < 60
    assert reason == "length" and toks == _reference(llama, [8, 9], 5, ignore_eos=True)
    assert stats.extra["free_slots"] == 1 and stats.running_requests == 0


def test_seeded_sampling_reproduces(llama):
    """Seeded requests give the same tokens whatever their batch mates and slots, and whether their first
    token came from a prefill pass or from a decode step that carried their prompt (``mixed``)."""
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    variants = [dict(), dict(top_k=5), dict(top_p=0.8), dict(top_k=10, top_p=0.9, temperature=0.7)]

    async def run_once(order, mixed_segments=4, stagger=0.0):
        eng = _engine(llama, mixed_segments=mixed_segments)
        await eng.start()
        try:
            tasks = []
            for i in order:
                p = prompts[i % len(prompts)]
                v = variants[i % len(variants)]
                sp = SamplingParams(max_new_tokens=16, do_sample=True, seed=1000 + i, ignore_eos=True, **v)
                tasks.append(_collect(eng, GenerationRequest(f"s{i}", p, sp), delay=stagger * len(tasks)))
            res = await asyncio.gather(*tasks)
            return {i: r[0] for i, r in zip(order, res)}, eng.stats().extra["prefills_in_decode_steps"]
        finally:
            await eng.stop()

    a, _ = asyncio.run(run_once(list(range(8))))
    b, _ = asyncio.run(run_once(list(reversed(range(8)))))   # other batch mates, other slots
    c, in_steps = asyncio.run(run_once(list(range(8)), stagger=0.004))   # arrivals during decode: mixed
    d, none = asyncio.run(run_once(list(range(8)), mixed_segments=0, stagger=0.004))
    assert in_steps >= 1 and none == 0
    assert a == b == c == d
    greedy = _reference(llama, prompts[0], 16, ignore_eos=True)
    assert a[0] != greedy                  # temperature 1 over a 96-token vocab: not the argmax path
    # top_k=1 sampling is greedy whatever the seed
    async def topk1():
        eng = _engine(llama)
        await eng.start()
        try:
            sp = SamplingParams(max_new_tokens=16, do_sample=True, top_k=1, seed=5, ignore_eos=True)
            return (await _collect(eng, GenerationRequest("k1", prompts[0], sp)))[0]
        finally:
            await eng.stop()
    assert asyncio.run(topk1()) == greedy


def test_sampled_token_does_not_depend_on_batch_mates_filters():
    """A row without top-k/top-p draws the same token alone and next to a row with a filter (whose sort must not
    reorder the other rows' draws); the filtered rows draw only tokens their filters keep."""
    from model_server.engines.fast.sampling import SlotSampling, select_tokens

    torch.manual_seed(0)
    logits = torch.randn(3, 96) * 2
    params = SlotSampling.allocate(3, torch.device("cpu"))
    params.do_sample[:] = True
    params.top_k[1] = 5
    params.top_p[2] = 0.5
    top5 = set(logits[1].topk(5).indices.tolist())
    probs = torch.softmax(logits[2], dim=-1).sort(descending=True)
    nucleus = set(probs.indices[:int((probs.values.cumsum(0) < 0.5).sum()) + 1].tolist())
    for seed in range(200):
        params.seed[:] = seed
        counter = torch.full((3,), seed % 7, dtype=torch.int64)
        alone, _ = select_tokens(logits[:1], slice(0, 1), params, counter[:1], True, False)
        batch, _ = select_tokens(logits, slice(0, 3), params, counter, True, True)
        assert batch[0] == alone[0], seed
        assert int(batch[1]) in top5 and int(batch[2]) in nucleus, seed


def test_rejects_bad_input_and_models(llama):
    async def main():
        eng = _engine(llama, max_seq_len=32, length_buckets=[32])
        await eng.start()
        try:
            too_long = [ev async for ev in eng.submit(GenerationRequest("x", list(range(4, 40)), SamplingParams()))]
            capped = await _collect(eng, GenerationRequest("y", list(range(4, 30)),
                                                           SamplingParams(max_new_tokens=50, ignore_eos=True)))
            return too_long, capped
        finally:
            await eng.stop()

    too_long, (toks, reason) = asyncio.run(main())
    assert too_long[-1].finish_reason == "error" and too_long[-1].error
    assert reason == "length" and len(toks) == 32 - 26
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModel):
        FastEngine(gpt2, [0], device="cpu")
