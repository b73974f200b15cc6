"""The fast engine serves while torch.fx traces in another thread.

torch.fx's tracer replaces ``nn.Module.__call__`` (for every thread) while it traces; inductor runs such a
trace during the background compile (``InterpreterShim``'s placeholder graph). A step that called the
model's modules through ``__call__`` meanwhile failed with ``NameError: module is not installed as a
submodule`` (an H100 cold start, 2026-12-05: 16 held int4 requests lost). Here a real trace is held open in
a thread while the engine serves; the greedy tokens must equal ``model.generate``'s.
"""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model_server.engines.base import GenerationRequest, SamplingParams  # noqa: E402
from model_server.engines.fast import FastEngine  # noqa: E402
from model_server.int4 import ComputeChoice, quantize_model  # noqa: E402
from tests.fast_engine_support import EOS, _reference, _tiny  # noqa: E402


class HeldTrace:
    """``torch.fx.symbolic_trace`` of a function that waits inside the trace until :meth:`release`."""

    def __init__(self) -> None:
        self.inside = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._trace, name="held-fx-trace", daemon=True)

    def _trace(self) -> None:
        def traced(x):
            self.inside.set()
            self.done.wait(30)
            return x
        try:
            torch.fx.symbolic_trace(traced)
        except BaseException as e:     # noqa: BLE001 - reported by release()
            self.error = e

    def __enter__(self) -> "HeldTrace":
        self.thread.start()
        assert self.inside.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join(10)
        assert self.error is None, self.error


async def _greedy(eng, rid: str, prompt: list[int], n: int) -> list[int]:
    toks = []
    async for ev in eng.submit(GenerationRequest(rid, prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))):
        assert ev.error is None and ev.finish_reason != "error", ev.error
        if ev.token_id is not None:
            toks.append(ev.token_id)
    return toks


def _serve_during_trace(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    async def main():
        eng = FastEngine(model, [EOS], max_batch=4, max_seq_len=64, length_buckets=[32, 64], device="cpu")
        await eng.start()
        try:
            with HeldTrace():
                assert torch.nn.Module.__call__ is not torch.nn.Module._wrapped_call_impl   # the tracer's patch is on
                return await asyncio.gather(*(_greedy(eng, f"r{i}", p, n) for i, p in enumerate(prompts)))
        finally:
            await eng.stop()
    return asyncio.run(main())


PROMPTS = [[5, 17, 33, 9, 60, 11], [7, 8], [40, 41, 42, 43, 44, 45, 46, 47, 48]]


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_serves_while_fx_traces_in_another_thread(quant):
    model = _tiny("llama", hidden_size=128, intermediate_size=256)   # wide enough for int4pack on every linear
    if quant == "int4":
        assert quantize_model(model, 32, ComputeChoice(torch.float32, "cpu-int4pack", "test")) == 2 * 7 + 1
    want = [_reference(model, p, 8, ignore_eos=True) for p in PROMPTS]
    assert _serve_during_trace(model, PROMPTS, 8) == want


def test_a_module_with_hooks_still_runs_them():
    from model_server.engines.fast.direct import hooked, run

    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    assert not hooked(lin)
    with HeldTrace():                       # no hook: forward directly, unaffected by the tracer's patch
        torch.testing.assert_close(run(lin, x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    seen = []
    lin.register_forward_hook(lambda mod, args, out: seen.append(out.shape) or out * 2)
    assert hooked(lin)
    torch.testing.assert_close(run(lin, x), 2 * torch.nn.functional.linear(x, lin.weight, lin.bias))
    assert seen == [torch.Size([2, 3])]
    plain = torch.nn.Linear(4, 3)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, args, out: out + 1)
    try:                                    # a global hook counts too
        assert hooked(plain)
        torch.testing.assert_close(run(plain, x), torch.nn.functional.linear(x, plain.weight, plain.bias) + 1)
    finally:
        handle.remove()
    assert not hooked(plain)
