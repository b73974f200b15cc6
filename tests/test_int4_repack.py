"""GPTQ checkpoints on the fast engine's INT4 kernels (model_server.int4_repack): no gptqmodel, same weights."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from model_server import fast_load, int4_repack
from model_server.engines.fast.runner import ModelRunner
from model_server.int4 import ComputeChoice, Int4Linear, device_compute
from tests.conftest import start_model_server, synth_qwen2_with_biases
from tests.int4_checkpoints import write_awq, write_gptq
from tests.test_int4 import _greedy_fast, _greedy_hf

FP32 = ComputeChoice(torch.float32, "dequant", "test: fp32, dequantize then matmul")
CASES = [("gptq", True, False, 32), ("gptq", False, False, 64), ("gptq_v2", False, True, 32),
         ("gptq", True, True, 128), ("awq", False, False, 32), ("awq", False, False, 128)]


def _write(src: Path, dst: Path, case: tuple, seed: int) -> dict:
    fmt, sym, desc_act, group = case
    if fmt == "awq":
        return write_awq(src, dst, group)
    return write_gptq(src, dst, group, fmt, sym, desc_act, seed=seed)


@pytest.fixture(scope="module")
def gptq_dirs(tiny_model_dir, tmp_path_factory):
    """(format, sym, desc_act, group) -> (checkpoint dir, the weights it stands for); format gptq, gptq_v2 or awq."""
    base = tmp_path_factory.mktemp("int4ckpt")
    return {case: (d := base / "-".join(map(str, case)), _write(Path(tiny_model_dir), d, case, i))
            for i, case in enumerate(CASES)}


def _linears(ckpt: Path, choice: ComputeChoice) -> dict[str, Int4Linear]:
    sp = int4_repack.spec(json.loads((ckpt / "config.json").read_text()))
    return int4_repack.take_linears(load_file(str(ckpt / "model.safetensors")), sp, choice)


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_repacked_linears_hold_the_checkpoints_weights(gptq_dirs, case):
    ckpt, ref = gptq_dirs[case]
    exact = _linears(ckpt, FP32)
    assert set(exact) == set(ref) and len(ref) == 2 * 7
    # act order: a gather of the input wherever a layer has more than one group
    assert all((m.input_perm is not None) == (case[2] and m.in_features > case[3]) for m in exact.values())
    for name, m in exact.items():        # x = I: row i of the output is input column i of W (act order undone)
        got = m(torch.eye(m.in_features)).T.double()
        assert torch.equal(got, torch.from_numpy(ref[name])), name
    for name, m in _linears(ckpt, device_compute("cpu")).items():      # bf16 on CPU's int4pack kernel
        want = torch.from_numpy(ref[name]).float()
        got = m(torch.eye(m.in_features)).T.float()
        assert float((got - want).abs().max() / want.abs().max()) < 0.01, name


def test_greedy_on_repacked_gptq_equals_generate(tiny_model_dir, gptq_dirs):
    """Act order and merged projections: q/k/v and gate/up share their input's order, so they still merge."""
    from model_server.loading import load_model

    ckpt, _ = gptq_dirs[("gptq_v2", False, True, 32)]
    m = load_model(tiny_model_dir, "cpu", "none").model.float()      # transformers' model, fp32
    for name, lin in _linears(ckpt, ComputeChoice(torch.float32, "cpu-int4pack", "test")).items():
        parent, _, attr = name.rpartition(".")
        setattr(m.get_submodule(parent), attr, lin)
    m.is_int4_weight_only = True
    runner = ModelRunner(m, 2, 64, use_cuda_graphs=False, fuse=False)
    assert all(x is not None for x in runner.qkv + runner.gate_up)
    rng = random.Random(5)
    prompts = [[rng.randrange(5, m.config.vocab_size) for _ in range(rng.randint(2, 20))] for _ in range(5)]
    assert _greedy_fast(m, prompts, 10) == [_greedy_hf(m, p, 10) for p in prompts]


def _logits_match_the_dequantized_float_model(src: str, ckpt: Path, ref: dict, tmp_path: Path) -> None:
    """The native load of ``ckpt``: INT4 linears, bf16 elsewhere, and last-position logits of a float model holding
    the weights the checkpoint stands for (``src`` with each linear's dequantized weight; biases as stored)."""
    from transformers import AutoModelForCausalLM

    from model_server.loading import load_model

    lm = load_model(str(ckpt), "cpu", "none", native=True)
    plain = load_model(src, "cpu", "none", native=True)
    assert (lm.load_path, lm.dtype) == ("native", "bfloat16") and lm.quantization in ("gptq", "awq")
    assert lm.model.is_int4_weight_only and lm.model.int4_kernel == "cpu-int4pack"
    assert sum(isinstance(m, Int4Linear) for m in lm.model.modules()) == 2 * 7
    assert lm.parameters == plain.parameters and lm.weight_bytes < 0.4 * plain.weight_bytes
    ref_dir = tmp_path / "dequantized"
    subprocess.run(["cp", "-r", src, str(ref_dir)], check=True)
    state = load_file(str(ref_dir / "model.safetensors"))
    state.update({f"{k}.weight": torch.from_numpy(v).float().contiguous() for k, v in ref.items()})
    save_file(state, str(ref_dir / "model.safetensors"))
    hf = AutoModelForCausalLM.from_pretrained(str(ref_dir), dtype=torch.float32)
    runner = ModelRunner(lm.model, 4, 64, use_cuda_graphs=False, fuse=False)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(5, lm.model.config.vocab_size, size=n).tolist() for n in (3, 9, 17, 30)]
    with torch.inference_mode():
        got = runner.prefill(list(range(4)), prompts).float()
        want = torch.stack([hf(torch.tensor([p])).logits[0, -1] for p in prompts])
    rel = float((got - want).norm() / want.norm())
    assert rel < 0.03, rel
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.75


@pytest.mark.parametrize("case", [("gptq", False, False, 64), ("awq", False, False, 32)], ids=["gptq", "awq"])
def test_native_load_of_a_prequantized_checkpoint(tiny_model_dir, gptq_dirs, case, tmp_path):
    ckpt, ref = gptq_dirs[case]
    _logits_match_the_dequantized_float_model(tiny_model_dir, ckpt, ref, tmp_path)


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_qwen2_with_qkv_biases(tmp_path, fmt):
    """Qwen2 keeps q/k/v biases next to the quantized weights: the repacked linears carry them."""
    src = Path(synth_qwen2_with_biases(tmp_path / "tiny-qwen2"))
    ckpt = tmp_path / f"qwen2-{fmt}"
    ref = write_awq(src, ckpt, 32) if fmt == "awq" else write_gptq(src, ckpt, 32, "gptq", True, True, seed=3)
    state = load_file(str(ckpt / "model.safetensors"))
    assert state["model.layers.0.self_attn.q_proj.bias"].abs().sum() > 0
    lins = _linears(ckpt, FP32)
    assert all((lins[n].bias is not None) == n.endswith(("q_proj", "k_proj", "v_proj")) for n in lins)
    _logits_match_the_dequantized_float_model(str(src), ckpt, ref, tmp_path)


@pytest.mark.parametrize("case", [("gptq", True, True, 128), ("awq", False, False, 32)], ids=["gptq", "awq"])
def test_serve_a_prequantized_checkpoint_on_the_fast_engine(gptq_dirs, case):
    import openai

    ckpt, _ = gptq_dirs[case]
    with start_model_server(str(ckpt), "--engine", "fast") as srv:
        with urllib.request.urlopen(srv.url + "/info", timeout=10) as r:
            info = json.loads(r.read())
        assert (info["quantization"], info["load_path"], info["int4_kernel"]) == (case[0], "native", "cpu-int4pack")
        assert info["int4_kernel_reason"] == "cpu"
        assert info["transformers_imported"] is False
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        out = client.completions.create(model=info["model_id"], prompt="hello", max_tokens=6, temperature=0)
        assert out.usage.completion_tokens == 6


@pytest.mark.parametrize("case, change, words", [
    ("gptq", {"bits": 8}, "GPTQ bits 8"), ("gptq", {"group_size": -1}, "group_size -1"),
    ("gptq", {"checkpoint_format": "marlin"}, "marlin"), ("gptq", {"dynamic": {"-:.*lm_head": {}}}, "dynamic"),
    ("gptq", {"pack_dtype": "int16"}, "pack_dtype"), ("awq", {"version": "gemv"}, "AWQ version 'gemv'"),
    ("awq", {"zero_point": False}, "zero points"), ("awq", {"bits": 3}, "AWQ bits 3"),
    ("awq", {"quant_method": "hqq"}, "quant_method hqq")])
def test_what_cannot_be_repacked_says_why(gptq_dirs, case, change, words):
    ckpt, _ = gptq_dirs[("gptq", True, False, 32) if case == "gptq" else ("awq", False, False, 32)]
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"].update(change)
    assert words in int4_repack.unsupported_reason(cfg)
    why = fast_load.unsupported_reason(str(ckpt), "none", cfg, repack=True)
    assert why.startswith("pre-quantized checkpoint (") and words in why
    assert fast_load.unsupported_reason(str(ckpt), "none", json.loads((ckpt / "config.json").read_text()),
                                        repack=True) is None


def test_quantization_flag_must_match_the_checkpoint(gptq_dirs):
    """--quantization gptq takes a GPTQ checkpoint natively, not an AWQ one (it would be reported as gptq)."""
    for case, flag, native in [(("gptq", True, False, 32), "gptq", True), (("awq", False, False, 32), "gptq", False),
                               (("awq", False, False, 32), "none", True), (("gptq", True, False, 32), "int4", False)]:
        ckpt, _ = gptq_dirs[case]
        cfg = json.loads((ckpt / "config.json").read_text())
        assert (fast_load.unsupported_reason(str(ckpt), flag, cfg, repack=True) is None) == native, (case, flag)


@pytest.mark.parametrize("case", [("gptq", True, False, 32), ("awq", False, False, 32)], ids=["gptq", "awq"])
def test_the_transformers_engine_points_to_the_repack_in_one_line(gptq_dirs, case):
    """Without gptqmodel, the transformers engine cannot load these; its one-line error names --engine fast."""
    import importlib.util

    if importlib.util.find_spec("gptqmodel") is not None:
        pytest.skip("gptqmodel is installed here")
    ckpt, _ = gptq_dirs[case]
    r = subprocess.run([sys.executable, "-m", "model_server", "serve", str(ckpt), "--port", "0", "--device", "cpu",
                        "--engine", "transformers"], capture_output=True, text=True, timeout=90)
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(errors) == 1, r.stderr[-2000:]
    assert "gptqmodel" in errors[0] and "--engine fast" in errors[0]


def test_uneven_act_order_groups_are_refused():
    with pytest.raises(int4_repack.RepackUnsupported, match="group_size"):     # group 1 holds 5 columns
        int4_repack.group_order(torch.tensor([0, 1, 1, 1, 0, 0, 1, 1]), 8, 4)
    assert int4_repack.group_order(torch.arange(8) // 4, 8, 4) is None
    perm = int4_repack.group_order(torch.tensor([1, 0, 1, 0, 0, 1, 1, 0]), 8, 4)
    assert perm.tolist() == [1, 3, 4, 7, 0, 2, 5, 6]


def test_a_gptq_checkpoint_the_repack_refuses_needs_gptqmodel_in_one_line(gptq_dirs, tmp_path):
    import importlib.util
    import shutil

    if importlib.util.find_spec("gptqmodel") is not None:
        pytest.skip("gptqmodel is installed here")
    ckpt, _ = gptq_dirs[("gptq", True, False, 32)]
    bad = tmp_path / "bits3"
    shutil.copytree(ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "-m", "model_server", "serve", str(bad), "--port", "0", "--device", "cpu",
                        "--engine", "fast"], capture_output=True, text=True, timeout=90)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "gptqmodel" in errors[0], r.stderr[-2000:]


def test_prewarm_repacks_layer_zero_of_a_gptq_checkpoint(gptq_dirs, monkeypatch):
    """The kernel pre-warm's stand-in runs on INT4 linears repacked from the checkpoint (INT4 kernels loaded during the
    load, as for --quantization int4), and leaves the state as it found it."""
    from model_server.engines.fast import prewarm

    ckpt, _ = gptq_dirs[("gptq_v2", False, True, 32)]
    state = load_file(str(ckpt / "model.safetensors"))
    before = {k: v.clone() for k, v in state.items()}
    built: list[Int4Linear] = []
    real = int4_repack.repack
    monkeypatch.setattr(int4_repack, "repack", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    marks: dict[str, float] = {}
    assert prewarm.prewarm(json.loads((ckpt / "config.json").read_text()), state, torch.float16, "none", marks) > 0
    assert len(built) == 7 and "prewarm_end" in marks
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)


@pytest.mark.parametrize("qc", [{"quant_method": "gptq", "bits": "four", "group_size": 128},
                                {"quant_method": "awq", "bits": 4, "group_size": "128x"},
                                {"quant_method": "gptq", "bits": 4, "group_size": None}, {}])
def test_odd_quantization_configs_are_reasons_not_crashes(qc):
    assert isinstance(int4_repack.unsupported_reason({"quantization_config": qc}), str)
