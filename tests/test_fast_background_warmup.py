"""Background warm-up (model_server.engines.fast.warmup) on CPU with a fake compiler: the engine serves
eagerly while the worker "compiles" (blocked here until the test lets it go), the worker runs every shape
family through a shadow runner on its own thread, then the engine switches to the fused ops; greedy
output is the same before and after the switch and equal to ``model.generate``."""
from __future__ import annotations

import asyncio
import threading

import pytest

transformers = pytest.importorskip("transformers")

from model_server.engines.base import GenerationRequest, SamplingParams  # noqa: E402
from model_server.engines.fast import FastEngine  # noqa: E402
from model_server.engines.fast import fused  # noqa: E402
from tests.fast_engine_support import EOS, _reference, _tiny  # noqa: E402


class FakeCompiler:
    """Stands in for torch.compile: eager functions that record the calling thread; the worker's first
    call waits for ``gate`` (compiling takes a while)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.calls: list[tuple[str, str]] = []

    def compiled(self) -> dict[str, object]:
        def wrap(name, fn):
            def call(*args):
                thread = threading.current_thread().name
                if thread == "fast-engine-warmup":
                    assert self.gate.wait(30)
                self.calls.append((name, thread))
                return fn(*args)
            return call
        return {n: wrap(n, f) for n, f in (("rms_norm", fused.rms_norm), ("add_rms_norm", fused.add_rms_norm),
                                           ("rope", fused.rope), ("silu_mul", fused.silu_mul),
                                           ("add_parts_rms_norm", fused.add_parts_rms_norm))}


async def _greedy(eng, rid: str, prompt: list[int], n: int) -> list[int]:
    toks = []
    async for ev in eng.submit(GenerationRequest(rid, prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))):
        if ev.token_id is not None:
            toks.append(ev.token_id)
    return toks


def test_serves_eagerly_then_switches_to_fused(monkeypatch):
    fake = FakeCompiler()
    monkeypatch.setattr(fused.Ops, "_compiled", None)
    monkeypatch.setattr(fused.Ops, "_get_compiled", classmethod(lambda cls: fake.compiled()))
    model = _tiny("llama")
    prompt = [5, 17, 33, 9, 60, 11]
    want = _reference(model, prompt, 10, ignore_eos=True)
    switched: list[str] = []

    async def main():
        eng = FastEngine(model, [EOS], max_batch=4, max_seq_len=64, length_buckets=[32, 64], device="cpu",
                         fuse=True, background_warmup=True)
        eng.on_warm = lambda: switched.append(threading.current_thread().name)
        await eng.start()                                  # returns without compiling anything
        try:
            assert eng.stats().extra["warm"] == 0.0 and not eng.runner.ops.fused
            before = await asyncio.gather(_greedy(eng, "a", prompt, 10), _greedy(eng, "b", prompt[:2], 4))
            assert not eng.runner.ops.fused and fake.calls == []        # served eagerly, worker still blocked
            fake.gate.set()
            assert await eng.wait_warm(30)
            assert eng.runner.ops.fused and eng.stats().extra["warm"] == 1.0
            worker = {n for n, t in fake.calls if t == "fast-engine-warmup"}
            assert worker == {"rms_norm", "add_rms_norm", "rope", "silu_mul"}
            # the shadow runner ran 2 batch sizes x (3 prompt lengths + decode) forwards of 2 layers
            assert sum(n == "rope" and t == "fast-engine-warmup" for n, t in fake.calls) >= 2 * 4 * 2
            n_worker = len(fake.calls)
            after = await _greedy(eng, "c", prompt, 10)
            assert any(t == "fast-engine" for _, t in fake.calls[n_worker:])   # the engine uses them now
            return before, after
        finally:
            await eng.stop()

    (first, short), after = asyncio.run(main())
    assert first == want and after == want and len(short) == 4
    assert switched == ["fast-engine"]


def test_compile_failure_keeps_serving_eagerly(monkeypatch):
    def broken(cls):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(fused.Ops, "_compiled", None)
    monkeypatch.setattr(fused.Ops, "_get_compiled", classmethod(broken))
    model = _tiny("llama")
    prompt = [5, 17, 33]

    async def main():
        eng = FastEngine(model, [EOS], max_batch=2, max_seq_len=64, length_buckets=[64], device="cpu", fuse=True,
                         background_warmup=True)
        await eng.start()
        try:
            assert await eng.wait_warm(30)
            assert not eng.runner.ops.fused and eng.runner.ops.error
            return await _greedy(eng, "a", prompt, 5)
        finally:
            await eng.stop()

    assert asyncio.run(main()) == _reference(model, prompt, 5, ignore_eos=True)
