"""Cold start, issue 17: the kernel pre-warm during the load (model_server.engines.fast.prewarm) changes no
tensor and no token, and the background compile waits for the first prefill (model_server.engines.fast.warmup).
CPU, the tiny preset (the pre-warm is forced on with MODEL_SERVER_PREWARM=1; its default is CUDA only)."""
from __future__ import annotations

import asyncio
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from model_server.engines.base import GenerationRequest, SamplingParams  # noqa: E402
from model_server.engines.fast import FastEngine, fused, prewarm  # noqa: E402
from model_server.engines.fast.warmup import BackgroundWarmup  # noqa: E402
from model_server.loading import _read_local_config, load_model  # noqa: E402


@pytest.mark.parametrize("quant", ["bf16", "int4"])
def test_prewarm_runs_the_eager_path_and_writes_nothing(tiny_model_dir, quant):
    state = load_file(f"{tiny_model_dir}/model.safetensors")
    before = {k: v.clone() for k, v in state.items()}
    marks: dict[str, float] = {}
    dtype = state["model.embed_tokens.weight"].dtype      # the stand-in uses the state's tensors themselves
    seconds = prewarm.prewarm(_read_local_config(tiny_model_dir), state, dtype, quant, marks)
    assert seconds > 0 and "prewarm_end" in marks
    assert state.keys() == before.keys()
    assert all(torch.equal(state[k], before[k]) for k in state)


def test_prewarm_checks_the_decode_attention_kernel_when_it_is_on(tiny_model_dir, monkeypatch):
    """With MODEL_SERVER_FAST_DECODE_ATTN=1 the stand-in's decode step runs the kernel's check (and so its
    compiles) during the load; unset on CPU (where the engine keeps SDPA by default), or with =0, it does not."""
    from model_server.engines.fast import decode_attn

    calls = []
    real = decode_attn.self_check
    monkeypatch.setattr("model_server.engines.fast.runner.decode_attn_check",
                        lambda *a: calls.append(a) or real(*a))
    state = load_file(f"{tiny_model_dir}/model.safetensors")
    config = _read_local_config(tiny_model_dir)
    prewarm.prewarm(config, state, state["model.embed_tokens.weight"].dtype, "bf16")
    assert calls == []
    monkeypatch.setenv("MODEL_SERVER_FAST_DECODE_ATTN", "0")
    prewarm.prewarm(config, state, state["model.embed_tokens.weight"].dtype, "bf16")
    assert calls == []
    monkeypatch.setenv("MODEL_SERVER_FAST_DECODE_ATTN", "1")
    prewarm.prewarm(config, state, state["model.embed_tokens.weight"].dtype, "bf16")
    assert len(calls) == 1 and calls[0][3:5] == (config["num_attention_heads"] // config["num_key_value_heads"],
                                                 config["head_dim"])


def test_prewarm_failure_is_quiet(caplog):
    class Done:
        def result(self):
            return {"model.embed_tokens.weight": torch.zeros(4, 8)}     # no layer 0: the stand-in fails
    marks: dict[str, float] = {}
    with caplog.at_level("INFO"):
        prewarm.prewarm_quietly({"num_attention_heads": 2, "hidden_size": 8}, Done(), "auto", "bf16", marks)
    assert "prewarm_end" not in marks and "kernel pre-warm skipped" in caplog.text


def test_load_with_prewarm_builds_the_same_model(monkeypatch, tiny_model_dir):
    monkeypatch.setenv("MODEL_SERVER_DIRECT_LOAD", "1")
    monkeypatch.setenv("MODEL_SERVER_PREWARM", "0")
    ref = load_model(tiny_model_dir, "cpu", "bf16")
    monkeypatch.setenv("MODEL_SERVER_PREWARM", "1")
    got = load_model(tiny_model_dir, "cpu", "bf16")
    assert "prewarm_end" in got.load_marks and "prewarm_end" not in ref.load_marks
    a, b = ref.model.state_dict(), got.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Runner:
    fuse_requested = True
    device = torch.device("cpu")
    dtype = torch.float32
    use_graphs = False


def _warmup(hold_s: float, **kw: float) -> tuple[BackgroundWarmup, list[tuple[float, float]]]:
    called: list[tuple[float, float]] = []           # (when, the thread switch interval) per compile

    def make_ops(*_a):
        called.append((time.monotonic(), sys.getswitchinterval()))
        return fused.Ops(False)
    return BackgroundWarmup(_Runner(), make_ops=make_ops, hold_s=hold_s, **kw), called


def test_compile_waits_for_the_served_requests_to_finish():
    w, called = _warmup(hold_s=30)
    w.start()
    w.idle()                                             # idle before any request: not a reason to start
    time.sleep(0.2)
    assert called == [] and not w.done.is_set()          # held: no request yet
    w.served()
    time.sleep(0.2)
    assert called == [] and not w.done.is_set()          # requests in flight: still held
    w.idle()
    assert w.done.wait(5) and len(called) == 1


def test_compile_starts_after_the_hold_or_the_longest_deferral():
    w, called = _warmup(hold_s=0.1)
    t0 = time.monotonic()
    w.start()
    assert w.done.wait(5) and called and called[0][0] - t0 >= 0.1   # no request: starts after the hold
    w, called = _warmup(hold_s=30, max_defer_s=0.2)
    w.start()
    t0 = time.monotonic()
    w.served()                                           # load that never pauses: starts after max_defer_s
    assert w.done.wait(5) and called[0][0] - t0 >= 0.2 and w.deferred_s >= 0.2


def test_compile_runs_with_a_short_switch_interval_then_restores_it():
    before = sys.getswitchinterval()
    w, called = _warmup(hold_s=0.0, switch_interval_s=2e-5)
    w.start()
    assert w.done.wait(5)
    assert called[0][1] == pytest.approx(2e-5) and sys.getswitchinterval() == before
    w, called = _warmup(hold_s=0.0, switch_interval_s=0.0)  # 0: left alone
    w.start()
    assert w.done.wait(5) and called[0][1] == before


def test_engine_starts_the_compile_once_its_first_requests_are_done(monkeypatch):
    monkeypatch.setenv("MODEL_SERVER_FAST_WARMUP_HOLD_S", "60")
    in_flight_at_start: list[int] = []             # requests the engine was serving when the compile began
    engine: list[FastEngine] = []

    def fail(cls):
        in_flight_at_start.append(engine[0].sched.running)
        raise RuntimeError("no compiler here")       # the worker gives up at once: eager ops, then the switch
    monkeypatch.setattr(fused.Ops, "_compiled", None)
    monkeypatch.setattr(fused.Ops, "_get_compiled", classmethod(fail))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).float().eval()

    async def main() -> list[int]:
        eng = FastEngine(model, [], max_batch=2, max_seq_len=64, length_buckets=[64], device="cpu", fuse=True,
                         background_warmup=True)
        engine.append(eng)
        await eng.start()
        try:
            await asyncio.sleep(0.3)
            assert not in_flight_at_start                # held for the first request
            toks = [ev.token_id async for ev in eng.submit(GenerationRequest(
                "a", [5, 6, 7], SamplingParams(max_new_tokens=40, ignore_eos=True))) if ev.token_id is not None]
            assert await eng.wait_warm(10)
            return toks
        finally:
            await eng.stop()

    assert len(asyncio.run(main())) == 40
    assert in_flight_at_start == [0]                     # not while the request's 40 tokens were being served
