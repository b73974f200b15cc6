"""The residual add + RMSNorm as one Triton kernel (``engines/fast/norm_kernel.py``, ``MODEL_SERVER_FAST_NORM``), run
by Triton's interpreter on CPU: ``h`` bit for bit the fused op's, the normed row within one unit in the last place in
bf16 and fp16, a few in fp32 (its sum of squares adds in another order), split-K partials summed as the sum kernel
sums them, a fast engine with it still gives ``model.generate``'s greedy tokens, an INT4 decode step with partials the
logits of the eager ops, the background warm-up installs it, the switch, and the kernel compiles for sm_90 with
16-byte loads (the interpreter runs its Python, not Triton's compiler)."""
from __future__ import annotations


import pytest
import torch

from model_server.engines.fast import fused
from model_server.engines.fast import norm_kernel as nk
from model_server.engines.fast.rope_kv import available
from model_server.switches import SwitchValueError

from model_server import int4_triton_split
from tests.fast_engine_support import _greedy_vs_generate
from tests.int4_triton_support import fresh_switch, set_switch, tiny_int4_runner
from tests.triton_compile_support import compile_lines

pytestmark = pytest.mark.skipif(not available(16), reason="Triton is a declared dependency; CI installs it")

_fresh_switch = fresh_switch(int4_triton_split.sum_in_consumer)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between ``a`` and ``b`` in units in the last place of their dtype (same signs)."""
    ia = a.view(torch.int16 if a.element_size() == 2 else torch.int32).to(torch.int64)
    ib = b.view(torch.int16 if b.element_size() == 2 else torch.int32).to(torch.int64)
    return int((ia - ib).abs().max()) if a.numel() else 0


# the normed row's largest distance from the fused op's: one unit in the last place in the 16-bit dtypes (the rounding
# to them hides most of the fp32 sum's order); in fp32 the sum's and rsqrt's last bits show through
_ULPS = {torch.float32: 8, torch.bfloat16: 1, torch.float16: 1}


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(*shape, generator=g) * 2).to(dtype)
    x = torch.randn(*shape, generator=g).to(dtype)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
    return h, x, w, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 1, 64), (2, 5, 48), (7, 2048), (1, 1, 16)])
def test_add_rms_norm_is_the_fused_ops(dtype, shape):
    h, x, w, _ = _inputs(shape, dtype, 3)
    want_h, want_y = fused.add_rms_norm(h, x, w, 1e-5)
    got_h, got_y = nk.add_rms_norm(h, x, w, 1e-5)
    assert got_h.shape == shape and got_y.dtype == dtype
    assert torch.equal(got_h, want_h)                        # the residual add: exact
    assert (want_y.sign() * got_y.sign() >= 0).all() and _ulps(got_y, want_y) <= _ULPS[dtype]
    assert (got_y == want_y).float().mean() > 0.5            # and mostly the same bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 2, 4, 8])
def test_add_parts_rms_norm_sums_the_partials_in_split_order(dtype, splits):
    h, _, w, g = _inputs((5, 1, 96), dtype, 4)
    parts = torch.randn(splits, 5, 1, 96, generator=g) * 3
    want_h, want_y = fused.add_parts_rms_norm(h, parts, w, 1e-5)
    got_h, got_y = nk.add_parts_rms_norm(h, parts, w, 1e-5)
    assert torch.equal(got_h, want_h)
    assert _ulps(got_y, want_y) <= _ULPS[dtype]


def test_refuses_operands_that_do_not_fit():
    h, x, w, _ = _inputs((2, 64), torch.float32, 1)
    with pytest.raises(ValueError, match="do not fit"):
        nk.add_rms_norm(h, x, w[:32], 1e-5)
    with pytest.raises(ValueError, match="is not the residual's"):
        nk.add_rms_norm(h, x[:1], w, 1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        nk.add_parts_rms_norm(h, torch.randn(2, 2, 64, dtype=torch.float64), w, 1e-5)


def test_the_switch(monkeypatch):
    monkeypatch.delenv(nk.SWITCH, raising=False)
    ops = fused.Ops(False)
    # unset = auto: the kernel for ops built for a CUDA device (Triton's interpreter stands in for one here), not for
    # the CPU's or a device-less Ops
    assert nk.mode() == "auto" and not nk.usable() and not nk.usable("cpu") and not nk.install(ops)
    assert nk.usable("cuda") and nk.usable(torch.device("cuda", 0))
    assert ops.add_rms_norm is fused.add_rms_norm and not fused.Ops(False, torch.device("cpu")).norm_kernel
    monkeypatch.setattr(nk, "self_check", lambda device, dtype: None)     # no CUDA here to run it on (tested below)
    on_cuda = fused.Ops(False, torch.device("cuda"))    # an Ops built for CUDA carries it by default
    assert on_cuda.norm_kernel and on_cuda.add_rms_norm is nk.add_rms_norm
    monkeypatch.setenv(nk.SWITCH, "compiled")
    assert not nk.usable("cuda") and not fused.Ops(False, torch.device("cuda")).norm_kernel
    monkeypatch.setenv(nk.SWITCH, "triton")
    assert nk.usable() and nk.install(ops)
    assert ops.add_rms_norm is nk.add_rms_norm and ops.add_parts_rms_norm is nk.add_parts_rms_norm
    built = fused.Ops(False)                            # every Ops built with the switch on carries it
    assert built.norm_kernel and built.add_rms_norm is nk.add_rms_norm
    monkeypatch.setenv(nk.SWITCH, "fast")
    with pytest.raises(SwitchValueError, match="MODEL_SERVER_FAST_NORM must be one of auto, compiled, triton"):
        nk.mode()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_engine_with_the_kernel_matches_generate(arch, monkeypatch):
    calls = []
    real = nk.add_rms_norm
    monkeypatch.setattr(nk, "add_rms_norm", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setenv(nk.SWITCH, "triton")
    toks, refs, runner = _greedy_vs_generate(arch, 7)
    assert runner.ops.norm_kernel and calls and toks == refs


def test_an_int4_decode_step_with_partials_gives_the_eager_logits(monkeypatch):
    """The tiny INT4 Llama's decode step at 40 rows (o and down split K in the interpreter, their partials handed to
    the norms): with the kernel the logits are the eager ops' within float32 rounding."""
    set_switch(monkeypatch, int4_triton_split.SUM_IN_CONSUMER_SWITCH, "1", int4_triton_split.sum_in_consumer)
    runner = tiny_int4_runner(rope_kv=True)
    seen = []
    real = nk.add_parts_rms_norm
    monkeypatch.setattr(nk, "add_parts_rms_norm", lambda r, p, *a: seen.append(p.shape[0]) or real(r, p, *a))

    def step() -> torch.Tensor:
        with torch.inference_mode():
            runner.in_ids[:40] = torch.arange(40) % 50
            runner.in_pos[:40] = torch.arange(40) % 7
            return runner.decode_forward(40, 64).clone()
    want = step()
    monkeypatch.setenv(nk.SWITCH, "triton")
    assert nk.install(runner.ops)
    got = step()
    assert seen and min(seen) > 1                   # the partials reached the kernel
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


COMPILE_SM90 = """
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from model_server.engines.fast import norm_kernel as nk, rope_kv
rope_kv.available(64)                 # imports Triton into rope_kv (no GPU here: it answers False)
fn = nk._jitted()
names = ["res_ptr", "x_ptr", "w_ptr", "h_ptr", "y_ptr", "N", "stride_r", "stride_x", "stride_split", "stride_h",
         "stride_y", "eps"]
for dt, split in (("bf16", 0), ("bf16", 8), ("fp16", 4)):
    xt = "*fp32" if split else "*" + dt
    types = ["*" + dt, xt, "*" + dt, "*" + dt, "*" + dt] + ["i32"] * 6 + ["fp32"]
    const = dict(SPLIT=split, BLOCK=2048, BF16=dt == "bf16")
    sig = dict(zip(names, types), **{k: "constexpr" for k in const})
    # as a launch specializes them: pointers 16-byte aligned, the hidden size and strides multiples of 16
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(11)}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": nk._warps(2048)})
    loads = re.findall(r"ld\.global[.a-z0-9]*", k.asm["ptx"])
    print(dt, split, "st.global" in k.asm["ptx"], len(loads), all(".v4." in ld for ld in loads))
"""


def test_the_kernel_compiles_for_sm90(tmp_path):
    lines = compile_lines(COMPILE_SM90, tmp_path)
    # one 16-byte load per 8 columns of each input (x or each partial, the residual, the weight) and no narrower one
    assert lines[:3] == ["bf16 0 True 3 True", "bf16 8 True 18 True", "fp16 4 True 10 True"], lines


def test_the_background_warm_up_installs_it_and_warms_it(monkeypatch):
    """With the switch on, the ops the background warm-up compiles (here with the fake compiler of the warm-up's
    tests) carry the kernel: it runs on the warm-up's thread through the shadow runner, and on the engine's after
    the switch, with ``model.generate``'s tokens before and after."""
    import asyncio
    import threading

    from tests.fast_engine_support import EOS, _reference, _tiny
    from tests.test_fast_background_warmup import FakeCompiler, _greedy
    from model_server.engines.fast import FastEngine

    fake = FakeCompiler()
    fake.gate.set()
    monkeypatch.setattr(fused.Ops, "_compiled", None)
    monkeypatch.setattr(fused.Ops, "_get_compiled", classmethod(lambda cls: fake.compiled()))
    monkeypatch.setenv(nk.SWITCH, "triton")
    threads: list[str] = []
    real = nk.add_rms_norm
    monkeypatch.setattr(nk, "add_rms_norm", lambda *a: threads.append(threading.current_thread().name) or real(*a))
    model = _tiny("llama")
    prompt = [5, 17, 33, 9, 60, 11]

    async def main():
        eng = FastEngine(model, [EOS], max_batch=4, max_seq_len=64, length_buckets=[32, 64], device="cpu",
                         fuse=True, background_warmup=True)
        await eng.start()
        try:
            before = await _greedy(eng, "a", prompt, 8)
            assert await eng.wait_warm(30)
            assert eng.runner.ops.fused and eng.runner.ops.add_rms_norm is nk.add_rms_norm
            n = len(threads)
            after = await _greedy(eng, "b", prompt, 8)
            return before, after, threads[:n], threads[n:]
        finally:
            await eng.stop()

    before, after, warm, served = asyncio.run(main())
    want = _reference(model, prompt, 8, ignore_eos=True)
    assert before == want and after == want
    assert "fast-engine-warmup" in warm and set(served) == {"fast-engine"}
    # the compiled add + norm runs once, in the Ops' trial on the warm-up thread, and never serves
    assert [t for n, t in fake.calls if n == "add_rms_norm"] == ["fast-engine-warmup"]


def test_the_engine_stats_say_which_norm_runs(monkeypatch):
    """``norm_kernel`` in the fast engine's stats (``/info``, ``/metrics``): 1 where the runner's ops carry the kernel."""
    from model_server.engines.fast import FastEngine
    from tests.fast_engine_support import EOS, _tiny

    monkeypatch.setenv(nk.SWITCH, "auto")
    eng = FastEngine(_tiny("llama"), [EOS], device="cpu", max_batch=2, max_seq_len=32)
    assert eng.stats().extra["norm_kernel"] == 0.0               # auto on a CPU engine: the fused op
    monkeypatch.setenv(nk.SWITCH, "triton")
    eng.runner.ops = fused.Ops(False, torch.device("cpu"))       # the switch forces it (Triton's interpreter here)
    assert eng.stats().extra["norm_kernel"] == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_self_check_passes_the_kernel(dtype):
    assert nk.self_check("cpu", dtype) is None                   # Triton's interpreter on the CPU


def test_a_failing_kernel_is_left_out_with_one_warning(monkeypatch, caplog):
    """An Ops built for a device runs the self check first: a kernel that raises or gives another normed row is not
    installed, the fused op serves, and the Ops says why."""
    monkeypatch.setenv(nk.SWITCH, "triton")
    real = nk._launch
    monkeypatch.setattr(nk, "_launch", lambda *a: tuple(t * 1.5 for t in real(*a)))
    with caplog.at_level("WARNING"):
        ops = fused.Ops(False, torch.device("cpu"))
    assert not ops.norm_kernel and ops.add_rms_norm is fused.add_rms_norm
    assert ops.norm_kernel_error.startswith("differs from the fused op")
    monkeypatch.setattr(nk, "_launch", lambda *a: 1 / 0)
    ops = fused.Ops(False, torch.device("cpu"))
    assert not ops.norm_kernel and ops.norm_kernel_error.startswith("ZeroDivisionError")
    assert sum("kernel off, the fused op serves" in m for m in caplog.messages) == 2     # one per Ops built
    monkeypatch.setattr(nk, "_launch", real)
    ops = fused.Ops(False, torch.device("cpu"))
    assert ops.norm_kernel and ops.norm_kernel_error is None and ops.add_rms_norm is nk.add_rms_norm
