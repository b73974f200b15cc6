"""Compile the small-rows INT4 kernel (model_server/int4_gemv.py) for an H100/H200 (sm_90) on a machine WITHOUT a GPU.

For each launch configuration of benchmarks/int4_sweep.py's grid (or the ones given), Triton compiles the kernel with
the argument specializations a real launch gets (16-byte aligned pointers and strides), then Triton's bundled ptxas and
cuobjdump report: registers and spilled bytes per thread, shared memory per program, asynchronous copies in the main
loop (the software pipeline), and the main loop's SASS instructions per 4-bit weight (all threads of a program over
one iteration / weights the iteration reads). The last is a static count, not a measurement: an H200 SM issues 128
thread-instructions per clock, so N instructions per weight caps one SM at 128 / N weights per clock (4.8 TB/s over
132 SMs at 1.98 GHz needs ~37 weights per clock per SM). Owns nothing the server uses.

  python3 benchmarks/int4_compile_check.py                       # the sweep grid at M = 1, 8, 64 on every shape
  python3 benchmarks/int4_compile_check.py --config 16,4,16,1,4,4,1 --k 2048   # one GemvConfig (dot as 0/1)
"""
from __future__ import annotations

import argparse
import collections
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
from model_server import int4_gemv, int4_triton  # noqa: E402

SHAPES = {"qkv_proj": (3072, 2048), "o_proj": (2048, 2048), "gate_up_proj": (16384, 2048), "down_proj": (2048, 8192),
          "lm_head": (128256, 2048)}
ARGS = ("x_ptr", "w_ptr", "s_ptr", "z_ptr", "y_ptr", "M", "N", "KBLOCKS", "stride_xm", "stride_wn", "stride_ym",
        "stride_ys")


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


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def report(cfg: int4_gemv.GemvConfig, k: int) -> dict:
    kern = compile_sm90(cfg, k)
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
    weights = cfg.nb * cfg.block_n * int4_triton.block_k(128)
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores", info)
    return {"config": cfg_str(vars(cfg)), "registers": int(regs.group(1)) if regs else None,
            "spill_bytes": int(spill.group(1)) if spill else None, "shared_bytes": kern.metadata.shared,
            "async_copies": body.count("LDGSTS"), "instr_per_weight": len(body) * 32 * cfg.num_warps / weights,
            "top": collections.Counter(body).most_common(6)}


def main(argv: list[str] | None = None) -> int:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=head, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest)
    p.add_argument("--ms", default="1,8,64", help="rows M of the sweep grid (comma-separated)")
    p.add_argument("--config", default=None,
                   help="one GemvConfig: block_n,nb,block_m,split,stages,warps,dot[,prefetch] (dot, prefetch as 0/1)")
    p.add_argument("--k", type=int, default=2048, help="K for --config")
    args = p.parse_args(argv)
    if args.config:
        v = [int(t) for t in args.config.split(",")]
        todo = [(int4_gemv.GemvConfig(*v[:6], *map(bool, v[6:8])), args.k)]
    else:
        seen, todo = set(), []
        for m in (int(t) for t in args.ms.split(",")):
            for n, k in SHAPES.values():
                for cfg in gemv_configs(m, n, k, 128, 132):
                    if (cfg, k) not in seen:
                        seen.add((cfg, k))
                        todo.append((cfg, k))
    for cfg, k in todo:
        try:
            r = report(cfg, k)
            print(f"K={k} {r['config']}: {r['instr_per_weight']:.1f} instr/weight, {r['registers']} regs, "
                  f"{r['spill_bytes']} B spilled, {r['shared_bytes']} B shared, {r['async_copies']} async copies "
                  f"{r['top']}", flush=True)
        except Exception as e:              # noqa: BLE001 - one line per config that does not compile
            print(f"K={k} {cfg_str(vars(cfg))}: FAILED {e!r}"[:400], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
