"""benchmarks/int4_compile_check.py: the INT4 kernels compiled for an H100/H200 (sm_90) on a machine without a GPU.

The reports are static counts (registers, spills, tensor-core and other instructions in the main loop), so the
test checks that both kernels compile as a real launch would compile them and that the counts are read from the
SASS, not what the counts are.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"K=(\d+) (.+?): ([\d.]+) instr/weight, (\d+) tensor-core instr, (\d+) regs, (\d+) B spilled")


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``python *args`` from the repo root, compiling for real (no interpreter) into a cache under ``tmp_path``;
    ``args`` starting with ``-c`` run code, else benchmarks/int4_compile_check.py with them."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    cmd = list(args) if args[:1] == ("-c",) else ["benchmarks/int4_compile_check.py", *args]
    return subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_gemm_and_small_rows_kernel_compile_for_sm90(tmp_path):
    """The GEMM in its dequantize (M = 64) and fold (M <= 16) forms and the small-rows kernel each give one report
    line with a main loop that holds tensor-core instructions and spills nothing."""
    reports = []
    for args in (("--gemm", "--config", "64,64,1,3,4,1,0"), ("--gemm", "--config", "16,64,8,4,4,1,1", "--k", "8192"),
                 ("--config", "16,4,16,1,4,4,1")):
        r = _run(tmp_path, *args)
        assert r.returncode == 0, r.stderr[-2000:]
        m = LINE.search(r.stdout)
        assert m and "FAILED" not in r.stdout, r.stdout
        reports.append(m)
    dequant, fold, gemv = reports
    assert dequant.group(2).startswith("gemm") and dequant.group(2).endswith("TD")
    assert fold.group(1) == "8192" and fold.group(2).endswith("TF")
    for m in reports:
        assert float(m.group(3)) > 1.0 and int(m.group(4)) > 0 and int(m.group(6)) == 0, m.group(0)


def test_bad_config_is_a_one_line_error(tmp_path):
    for args in (("--gemm", "--config", "64,64,1"), ("--config", "a,b")):
        r = _run(tmp_path, *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("int4_compile_check.py: error:"), r.stderr


def test_gemm_is_compiled_once_for_every_row_count(monkeypatch):
    """The GEMM's launches do not specialize on the row count M, so the kernel pre-warm's padded 16-row prefill
    compiles the same kernel a 4- or 8-row decode step runs (Triton would otherwise compile M % 16 == 0 apart)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from model_server import int4_triton

    assert int4_triton._import_triton()
    gemm = int4_triton._jitted(False)[0]
    assert [p.name for p in gemm.params if p.do_not_specialize] == ["M"]


def test_the_gemm_as_a_programmatic_dependent_launch_waits_then_lets_the_next_kernel_launch(tmp_path):
    """MODEL_SERVER_INT4_TRITON_PDL: compiled for sm_90 with PDL the GEMM's PTX waits for the previous grid first
    (griddepcontrol.wait before any global load) and triggers the next one once (after the main loop); without,
    neither. With and without the ticket reduction. (A subprocess: this one may run Triton's interpreter.)"""
    code = """
import sys
sys.path.insert(0, "benchmarks")
import int4_compile_check
from model_server import int4_triton
cfg = int4_triton.choose_config(64, 3072, 2048, 128, 132)
assert cfg.split_k > 1
for ticket in (True, False):
    for pdl in (False, True):
        ptx = int4_compile_check.compile_gemm_sm90(cfg, 2048, ticket=ticket, pdl=pdl).asm["ptx"]
        body = ptx[ptx.index(".entry"):]
        wait = body.find("griddepcontrol.wait")
        print(ticket, pdl, body.count("griddepcontrol.wait"), body.count("griddepcontrol.launch_dependents"),
              wait >= 0 and wait < body.index("ld.global"))
"""
    r = _run(tmp_path, "-c", code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[:4] == ["True False 0 0 False", "True True 1 1 True", "False False 0 0 False",
                                        "False True 1 1 True"], r.stdout


@pytest.mark.parametrize("script,args,line", [
    ("int4_pdl_check", (), "int4_pdl_check: no CUDA device"),
    ("int4_repeat_check", (), "int4_repeat_check: no CUDA device"),
    ("int4_repeat_check", ("--kernels", "mma,gemm"), "int4_repeat_check: unknown kernel 'gemm' (of mma, gemv)"),
    ("int4_glu_check", (), "int4_glu_check: no CUDA device"),
    ("int4_glu_check", ("--ms", "64,x"),
     "int4_glu_check: --ms and --shape must be comma-separated integers, got '64,x' and '16384,2048'"),
    ("int4_glu_check", ("--device", "cpu"),
     "int4_glu_check: --device cpu needs TRITON_INTERPRET=1 (Triton's interpreter)"),
    ("int4_paired_check", (), "int4_paired_check: no CUDA device"),
    ("int4_paired_check", ("--shapes", "lm"), "int4_paired_check: --ms must be integers and --shapes names of "
     "qkv_proj, o_proj, gate_up_proj, down_proj, lm_head or one N,K; got '16,32,64,256' and 'lm'"),
    ("int4_paired_check", ("--device", "cpu"),
     "int4_paired_check: --device cpu needs TRITON_INTERPRET=1 (Triton's interpreter)")])
def test_the_bit_checks_say_what_is_wrong_in_one_line(tmp_path, script, args, line):
    """benchmarks/int4_pdl_check.py (PDL on and off give the same bits), int4_repeat_check.py (the small-rows
    kernels repeat their bits) and int4_glu_check.py (the GLU epilogue's bits and time) on a machine without a GPU,
    a kernel name the repeat check does not know, and rows that are not numbers."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run([sys.executable, f"benchmarks/{script}.py", "--out", str(tmp_path), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == line


def test_the_async_proxy_fence_lands_between_the_copies_wait_and_the_wgmma(tmp_path):
    """MODEL_SERVER_INT4_TRITON_FENCE: in the 64-row GEMM's main loop compiled for sm_90 the fence comes after the
    shared-memory copies are waited for (and the barrier) and before the first wgmma; without the switch, no fence."""
    code = """
import sys
sys.path.insert(0, "benchmarks")
import int4_compile_check
from model_server import int4_triton
cfg = int4_triton.choose_config(64, 2048, 2048, 128, 132)
for fence in (False, True):
    body = int4_compile_check.compile_gemm_sm90(cfg, 2048, ticket=False, fence=fence).asm["ptx"]
    body = body[body.index(".entry"):]
    loop = body[body.index("cp.async.wait_group"):]
    f = loop.find("fence.proxy.async.shared::cta")
    print(fence, body.count("fence.proxy.async"), 0 <= f < loop.index("wgmma.mma_async"),
          f > loop.index("bar.sync") if f >= 0 else None)
"""
    r = _run(tmp_path, "-c", code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[:2] == ["False 0 False None", "True 1 True True"], r.stdout


def test_paired_scales_ride_the_pipelines_copies_where_split_ones_are_plain_loads(tmp_path):
    """MODEL_SERVER_INT4_TRITON_PAIRED_SCALES: compiled for sm_90 at 16, 64 and 256 rows (the served configurations
    for q/k/v, of which 64 rows split K), the main loop with separate 16-bit scales and zeros holds four plain global
    loads (LDG) per K-block; with one int32 word per group and column none, and two more asynchronous copies (LDGSTS)
    instead, with no spills and the tensor-core instructions unchanged."""
    code = """
import sys
sys.path.insert(0, "benchmarks")
import int4_compile_check as cc
from model_server import int4_triton
for m in (16, 64, 256):
    cfg = int4_triton.choose_config(m, 3072, 2048, 128, 132)
    for paired in (False, True):
        r = cc.sass_report(cc.compile_gemm_sm90(cfg, 2048, paired=paired), 64 * 128, cfg.num_warps, "x")
        top = dict(r["loop_ops"])
        print(m, paired, top.get("LDG", 0), top.get("LDGSTS", 0), top.get("HGMMA", 0) + top.get("HMMA", 0),
              r["spill_bytes"])
"""
    r = _run(tmp_path, "-c", code)
    assert r.returncode == 0, r.stderr[-2000:]
    got = [line.split() for line in r.stdout.strip().split("\n")]
    assert len(got) == 6, r.stdout
    for split, paired in zip(got[::2], got[1::2]):
        assert split[1:3] == ["False", "4"] and paired[1:3] == ["True", "0"], r.stdout
        assert int(paired[3]) == int(split[3]) + 2 and paired[4] == split[4] and paired[5] == split[5] == "0", r.stdout


def test_the_glu_epilogue_compiles_for_sm90_as_a_merged_gate_up_is_served(tmp_path):
    """MODEL_SERVER_INT4_GLU_EPILOGUE: the GEMM with its GLU epilogue compiled for sm_90 in the configurations a merged
    gate/up of the 1B preset (16,384 x 2,048) gets at 64 rows (swap-AB) and 256 rows (normal order): no spills, the
    main loop's tensor-core instructions as without it, half the global stores (one output instead of gate and up)
    and silu's exponential in the epilogue; without the switch's constant, no exponential."""
    code = """
import sys
sys.path.insert(0, "benchmarks")
import int4_compile_check as icc
from model_server import int4_triton
for m in (64, 256):
    cfg = int4_triton.choose_config(m, 16384, 2048, 128, 132)
    assert cfg.split_k == 1
    got = []
    for glu in (False, True):
        kern = icc.compile_gemm_sm90(cfg, 2048, pdl=True, glu=glu)
        rep = icc.sass_report(kern, cfg.block_n * 128, cfg.num_warps, str(glu))
        ptx = kern.asm["ptx"]
        got.append((rep["spill_bytes"], rep["mma"], ptx.count("st.global"), ptx.count("ex2.approx") > 0))
    (s0, mma0, st0, ex0), (s1, mma1, st1, ex1) = got
    print(m, s0 == s1 == 0, mma0 == mma1 > 0, st1 * 2 == st0, ex0, ex1)
"""
    r = _run(tmp_path, "-c", code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[:2] == ["64 True True True False True", "256 True True True False True"], r.stdout


def test_the_command_line_reports_both_ways_with_paired(tmp_path):
    """``int4_compile_check.py --gemm --config ... --paired``: one line per way, the split scales' first, each with
    the main loop's plain global loads (what docs/benchmarks.md quotes from the command)."""
    r = _run(tmp_path, "--gemm", "--config", "64,64,1,4,4,1,0,1,1", "--paired")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().split("\n")
    assert len(lines) == 2 and "/paired:" not in lines[0] and "/paired:" in lines[1], r.stdout
    assert ", 4 plain global loads" in lines[0] and ", 0 plain global loads" in lines[1], r.stdout
    digests = [re.search(r", sass ([0-9a-f]{12}) ", line) for line in lines]
    assert all(digests) and digests[0].group(1) != digests[1].group(1), r.stdout   # different code, different digest
