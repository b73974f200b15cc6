"""Compile the small-rows INT4 kernel (model_server/int4_gemv.py) for an H100/H200 (sm_90) on a machine WITHOUT a GPU.

For each launch configuration of benchmarks/int4_sweep.py's grid (or the ones given), Triton compiles the kernel with
the argument specializations a real launch gets (16-byte aligned pointers and strides), then Triton's bundled ptxas and
cuobjdump report: registers and spilled bytes per thread, shared memory per program, asynchronous copies in the main
loop (the software pipeline), and the main loop's SASS instructions per 4-bit weight (all threads of a program over
one iteration / weights the iteration reads). The last is a static count, not a measurement: an H200 SM issues 128
thread-instructions per clock, so N instructions per weight caps one SM at 128 / N weights per clock (4.8 TB/s over
132 SMs at 1.98 GHz needs ~37 weights per clock per SM). Owns nothing the server uses.

The same for the W4A16 GEMM (model_server/int4_triton.py) with --gemm: its chosen config (choose_config, 132 SMs)
per rows M and shape, or one Config; weights per iteration are BLOCK_N x BLOCK_K.

  python3 benchmarks/int4_compile_check.py                       # the sweep grid at M = 1, 8, 64 on every shape
  python3 benchmarks/int4_compile_check.py --config 16,4,16,1,4,4,1 --k 2048   # one GemvConfig (dot as 0/1)
  python3 benchmarks/int4_compile_check.py --gemm --ms 8,64      # the GEMM's chosen config per M and shape
  python3 benchmarks/int4_compile_check.py --gemm --config 64,64,1,3,4,1,1 --k 2048  # one Config (swap_ab, fold 0/1)
  python3 benchmarks/int4_compile_check.py --gemm --config 64,64,1,3,4,1,0,1,1        # ... dequantizing by fma, PTX unpack
  python3 benchmarks/int4_compile_check.py --gemm --ms 64 --paired   # each config with split and paired scales
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from int4_sweep import cfg_str, gemv_configs  # noqa: E402
from model_server import int4_gemv, int4_triton, int4_triton_config  # noqa: E402

SHAPES = {"qkv_proj": (3072, 2048), "o_proj": (2048, 2048), "gate_up_proj": (16384, 2048), "down_proj": (2048, 8192),
          "lm_head": (128256, 2048)}
ARGS = ("x_ptr", "w_ptr", "s_ptr", "z_ptr", "y_ptr", "M", "N", "KBLOCKS", "stride_xm", "stride_wn", "stride_ym",
        "stride_ys")
GEMM_ARGS = ("x_ptr", "w_ptr", "s_ptr", "z_ptr", "y_ptr", "M", "N", "stride_xm", "stride_wn", "stride_ym", "stride_ys",
             "out_ptr", "cnt_ptr")


def compile_sm90(cfg: int4_gemv.GemvConfig, k: int, group: int = 128):
    """The compiled kernel for bf16 activations, as a launch with K = ``k`` would compile it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not int4_triton._import_triton():
        raise SystemExit("int4_compile_check: Triton is not installed")
    fn = int4_gemv._jitted(False)
    bk = int4_triton.block_k(group)
    types = ["*bf16", "*u8", "*bf16", "*bf16", "*bf16" if cfg.split == 1 else "*fp32"] + ["i32"] * 7
    sig = dict(zip(ARGS, types))
    const = dict(ITERS=-(-(k // bk) // (cfg.split * cfg.nb)), GROUP=group, BK=bk, HALF=bk // 2, BLOCK_N=cfg.block_n,
                 NB=cfg.nb, BLOCK_M=cfg.block_m, STAGES=cfg.num_stages, DOT=cfg.dot, PREFETCH=cfg.prefetch,
                 IEEE=False)
    sig.update({name: "constexpr" for name in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(ARGS) if name != "M"}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})


def compile_gemm_sm90(cfg: int4_triton.Config, k: int, group: int = 128, ticket: bool = True, pdl: bool = False,
                      fence: bool = False, glu: bool = False, paired: bool = False):
    """The W4A16 GEMM compiled for bf16 activations, as a launch with K = ``k`` and ``cfg`` would compile it (split K:
    with the ticket reduction, the default, unless ``ticket`` is False; ``pdl``: as a programmatic dependent launch;
    ``glu``: with the GLU epilogue, :mod:`model_server.int4_triton_glu`, which needs ``cfg.split_k`` 1; ``paired``:
    each group's scale and zero read as one int32 word, :func:`model_server.int4_triton_config.paired_scales_on`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not int4_triton._import_triton():
        raise SystemExit("int4_compile_check: Triton is not installed")
    fn = int4_triton._jitted(False)[0]
    bk = int4_triton.block_k(group)
    ticket = ticket and cfg.split_k > 1
    types = ["*bf16", "*u8", "*i32" if paired else "*bf16", "*bf16", "*bf16" if cfg.split_k == 1 else "*fp32"] \
        + ["i32"] * 6 \
        + ["*bf16", "*i32" if ticket else "*bf16"]
    sig = dict(zip(GEMM_ARGS, types))
    const = dict(ITERS_PER_SPLIT=k // bk // cfg.split_k, GROUP=group, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                 BLOCK_K=bk, HALF=bk // 2, MAGIC=0x4300, C8=136.0, SWAP_AB=cfg.swap_ab, FOLD=cfg.fold,
                 SPLIT=cfg.split_k if ticket else 1, TICKET=ticket, DEQ=int4_triton_config.deq(cfg, 0x4300, False),
                 PDL=pdl, FENCE=fence, GLU=glu, PAIRED=paired)
    sig.update({name: "constexpr" for name in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(GEMM_ARGS) if name != "M"}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def report(cfg: int4_gemv.GemvConfig, k: int) -> dict:
    """The small-rows kernel's report: :func:`sass_report` with ``nb`` K-blocks of ``block_n`` columns per iteration."""
    return sass_report(compile_sm90(cfg, k), cfg.nb * cfg.block_n * int4_triton.block_k(128), cfg.num_warps,
                       cfg_str(vars(cfg)))


def gemm_report(cfg: int4_triton.Config, k: int, paired: bool = False) -> dict:
    """The GEMM's report: one K-block of ``block_n`` columns per iteration (``paired``: reading each group's scale and
    zero as one int32 word)."""
    name = (f"gemm {cfg.block_m}/{cfg.block_n}/s{cfg.split_k}/st{cfg.num_stages}/w{cfg.num_warps}/"
            f"{'T' if cfg.swap_ab else 'N'}{'F' if cfg.fold else 'D'}"
            f"{'/fma' if cfg.fma else ''}{'-ptx' if cfg.ptx else ''}")
    return sass_report(compile_gemm_sm90(cfg, k, paired=paired), cfg.block_n * int4_triton.block_k(128),
                       cfg.num_warps, name + ("/paired" if paired else ""))


def sass_report(kern, weights: int, num_warps: int, name: str) -> dict:
    """Registers, spills, shared memory, async copies, tensor-core instructions and SASS instructions per 4-bit
    weight in the main loop (the longest backward branch) of a compiled kernel reading ``weights`` per iteration, and
    the count of each instruction there (``loop_ops``), and a digest of the whole kernel's SASS without addresses
    (``sass``: two checkouts that compile to the same code print the same)."""
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = Path(d, "k.ptx"), Path(d, "k.cubin")
        ptx.write_text(kern.asm["ptx"])
        cubin.write_bytes(kern.asm["cubin"])
        info = subprocess.run([_tool("ptxas"), "-arch=sm_90a", "-v", str(ptx), "-o", os.devnull],
                              capture_output=True, text=True).stderr
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
    ops = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\d\s+)?([A-Z0-9_.]+)([^;]*)", line)
        if m:
            ops.append((int(m.group(1), 16), m.group(2), m.group(3)))
    loops = [(int(t.group(1), 16), addr) for addr, op, rest in ops if op.startswith("BRA")
             for t in [re.search(r"0x([0-9a-f]+)", rest)] if t and int(t.group(1), 16) < addr]
    start, end = max(loops, key=lambda ab: ab[1] - ab[0]) if loops else (0, 0)
    body = [op.split(".")[0] for addr, op, _ in ops if start <= addr <= end]
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores", info)
    return {"config": name, "registers": int(regs.group(1)) if regs else None,
            "spill_bytes": int(spill.group(1)) if spill else None, "shared_bytes": kern.metadata.shared,
            "async_copies": body.count("LDGSTS"), "mma": sum(op in ("HMMA", "HGMMA") for op in body),
            "instr_per_weight": len(body) * 32 * num_warps / weights, "top": collections.Counter(body).most_common(6),
            "loop_ops": dict(collections.Counter(body)),
            "sass": hashlib.md5("\n".join(f"{op}{rest}" for _, op, rest in ops).encode()).hexdigest()[:12]}


def main(argv: list[str] | None = None) -> int:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=head, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest)
    p.add_argument("--ms", default="1,8,64", help="rows M of the sweep grid (comma-separated)")
    p.add_argument("--config", default=None,
                   help="one GemvConfig: block_n,nb,block_m,split,stages,warps,dot[,prefetch] (dot, prefetch as 0/1); "
                        "with --gemm one Config: block_m,block_n,split_k,stages,warps,swap_ab,fold[,fma[,ptx]] (0/1)")
    p.add_argument("--k", type=int, default=2048, help="K for --config")
    p.add_argument("--gemm", action="store_true", help="the W4A16 GEMM (int4_triton.py) instead of the small-rows kernel")
    p.add_argument("--paired", action="store_true",
                   help="with --gemm: each config also reading (scale, zero) as one int32 word "
                        "(MODEL_SERVER_INT4_TRITON_PAIRED_SCALES), on the line after the split scales' one")
    args = p.parse_args(argv)
    try:
        ms = [int(t) for t in args.ms.split(",")]
        vals = [int(t) for t in args.config.split(",")] if args.config else []
    except ValueError:
        p.error("--ms and --config take comma-separated integers")
    if args.gemm:
        if args.config and not 7 <= len(vals) <= 9:
            p.error("--gemm --config takes 7 to 9 integers: block_m,block_n,split_k,stages,warps,swap_ab,fold[,fma[,ptx]]")
        gemm = ([(int4_triton.Config(*vals[:5], *map(bool, vals[5:])), args.k)] if args.config else
                sorted({(int4_triton.choose_config(m, n, k, 128, 132), k) for m in ms for n, k in SHAPES.values()},
                       key=str))
        for cfg, k in gemm:
            for paired in (False, True) if args.paired else (False,):
                _print(lambda: gemm_report(cfg, k, paired), k, str(cfg))
        return 0
    if args.config:
        todo = [(int4_gemv.GemvConfig(*vals[:6], *map(bool, vals[6:8])), args.k)]
    else:
        seen, todo = set(), []
        for m in ms:
            for n, k in SHAPES.values():
                for cfg in gemv_configs(m, n, k, 128, 132):
                    if (cfg, k) not in seen:
                        seen.add((cfg, k))
                        todo.append((cfg, k))
    for cfg, k in todo:
        _print(lambda: report(cfg, k), k, cfg_str(vars(cfg)))
    return 0


def _print(make, k: int, name: str) -> None:
    """One line per config: its report, or why it did not compile."""
    try:
        r = make()
        print(f"K={k} {r['config']}: {r['instr_per_weight']:.1f} instr/weight, {r['mma']} tensor-core instr, "
              f"{r['registers']} regs, {r['spill_bytes']} B spilled, {r['shared_bytes']} B shared, "
              f"{r['async_copies']} async copies, {r['loop_ops'].get('LDG', 0)} plain global loads, sass {r['sass']} "
              f"{r['top']}", flush=True)
    except Exception as e:                  # noqa: BLE001 - one line per config that does not compile
        print(f"K={k} {name}: FAILED {e!r}"[:400], flush=True)


if __name__ == "__main__":
    sys.exit(main())
