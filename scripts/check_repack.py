"""The repack half of scripts/check_gptq.py: model_server.int4_repack's INT4 linears against gptqmodel's own
dequantization, bit for bit (run inside check_gptq.sh's throw-away venv, which has gptqmodel).

Owns those comparisons; the checkpoints come from gptqmodel (check_gptq.py quantizes one) and from
tests/int4_checkpoints.py. Must not start servers (check_gptq.py does).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def repack_agreement(c: Any, ckpt: Path, label: str) -> float | None:
    """Each GPTQ linear's weight as gptqmodel dequantizes it (``dequantize_weight()``, fp16 [K, N]; transformers'
    load) against model_server.int4_repack's INT4 linear in fp32 (dequantize, then matmul) applied to the identity,
    rounded to fp16: both are ``scales * (q - zero)`` rounded once, so they must be equal bit for bit."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from model_server import int4_repack
    from model_server.int4 import ComputeChoice

    model = AutoModelForCausalLM.from_pretrained(ckpt, device_map="cpu", dtype=torch.float32).eval()
    ours = int4_repack.take_linears(load_file(str(ckpt / "model.safetensors")),
                                    int4_repack.spec(json.loads((ckpt / "config.json").read_text())),
                                    ComputeChoice(torch.float32, "dequant", "check: fp32"))
    worst, equal = 0.0, 0
    with torch.no_grad():
        for name, lin in ours.items():
            theirs = model.get_submodule(name).dequantize_weight().float()
            got = lin(torch.eye(lin.in_features)).half().float()
            worst = max(worst, float((got - theirs).abs().max() / theirs.abs().max().clamp_min(1e-12)))
            equal += int(torch.equal(got, theirs))
    ok = c.check(f"repack: {label}: weights equal gptqmodel's dequantize_weight() bit for bit",
                 bool(ours) and equal == len(ours), f"{equal} of {len(ours)} linears; largest difference {worst:.2e} "
                 "of the weight's largest magnitude")
    return worst if ok else None


def awq_agreement(c: Any, ckpt: Path) -> float | None:
    """An AWQ (GEMM) checkpoint's linears as gptqmodel's own AWQ code dequantizes them (``dequantize_gemm``: unpack,
    undo AWQ's interleaved order, ``(q - z) * s`` in fp16) against model_server.int4_repack's, rounded to fp16."""
    import torch
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
    from safetensors.torch import load_file

    from model_server import int4_repack
    from model_server.int4 import ComputeChoice

    cfg = json.loads((ckpt / "config.json").read_text())
    state = load_file(str(ckpt / "model.safetensors"))
    group = cfg["quantization_config"]["group_size"]
    theirs = {k[: -len(".qweight")]: dequantize_gemm(state[k], state[k.replace("qweight", "qzeros")],
                                                     state[k.replace("qweight", "scales")], 4, group).float()
              for k in state if k.endswith(".qweight")}
    ours = int4_repack.take_linears(state, int4_repack.spec(cfg), ComputeChoice(torch.float32, "dequant", "check: fp32"))
    worst, equal = 0.0, 0
    with torch.no_grad():
        for name, lin in ours.items():
            got = lin(torch.eye(lin.in_features)).half().float()
            worst = max(worst, float((got - theirs[name]).abs().max() / theirs[name].abs().max().clamp_min(1e-12)))
            equal += int(torch.equal(got, theirs[name]))
    ok = c.check("repack: written AWQ (GEMM): weights equal gptqmodel's dequantize_gemm() bit for bit",
                 bool(ours) and equal == len(ours) == len(theirs),
                 f"{equal} of {len(ours)} linears; largest difference {worst:.2e} of the weight's largest magnitude")
    return worst if ok else None


def run(c: Any, src: Path, gptq_dir: Path, work: Path) -> dict[str, float | None]:
    """Every comparison: gptqmodel's checkpoint ``gptq_dir``, and checkpoints written from ``src`` (GPTQ with act
    order, asymmetric, formats gptq and gptq_v2; AWQ GEMM); returns each one's largest difference (None: failed)."""
    from tests.int4_checkpoints import write_awq, write_gptq

    out = {"gptqmodel": repack_agreement(c, gptq_dir, "gptqmodel's checkpoint")}
    for fmt in ("gptq", "gptq_v2"):
        written = work / f"tiny-written-{fmt}"
        subprocess.run(["rm", "-rf", str(written)], check=True)
        write_gptq(src, written, group_size=32, fmt=fmt, sym=False, desc_act=True)
        out[fmt] = repack_agreement(c, written, f"written {fmt}, act order, asymmetric")
    written = work / "tiny-written-awq"
    subprocess.run(["rm", "-rf", str(written)], check=True)
    write_awq(src, written, group_size=32)
    out["awq"] = awq_agreement(c, written)
    return out
