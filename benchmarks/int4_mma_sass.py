"""Static SASS of the CUDA W4A16 kernel (model_server/data/int4_mma.cu) per configuration, without a GPU.

Each configuration is compiled by NVRTC (``int4_mma_build.compile_cubin``, the server's own compiler path; libnvrtc
from the ``nvidia-cuda-nvrtc`` package of the test extra) and disassembled with Triton's bundled cuobjdump. Per
configuration: registers, and for one 64-column block of the main loop (the instructions between two barriers of its
steady state) the instructions, of them never-true predicated padding ptxas adds around cp.async (``@!PT``), HMMA
(tensor-core MMAs), LDS (shared loads) and LDGSTS (cp.async copies), and whether a loop sits inside that span (then
a warp issues another number than this static one). A count, not a timing: where one warp per scheduler runs (a
4-warp CTA per SM), every instruction's latency is exposed, so the count per block bounds how fast a block can go;
the GPU profile (``gpu_calls.sh mmaprof``, its executed instructions and stall reasons) says whether that is what
limits it.

  python3 benchmarks/int4_mma_sass.py [--arch 90] [--configs 'w4a16_mma<8,1,4,4>,w4a16_mma<8,1,4,4,1>'] [--out F.md]
  python3 benchmarks/int4_mma_sass.py --baseline-source OLD.cu --configs ...    # same instructions as OLD.cu's?
"""
from __future__ import annotations

import argparse
import ctypes
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_server import int4_mma_build  # noqa: E402

DEFAULT = ("w4a16_mma<1,1,4,4>", "w4a16_mma<1,1,4,4,1>", "w4a16_mma<1,1,16,4,1,4>", "w4a16_mma<2,1,4,4>",
           "w4a16_mma<2,1,4,4,1>", "w4a16_mma<2,1,16,4,1,4>", "w4a16_mma<8,1,4,4>", "w4a16_mma<8,1,4,4,1>",
           "w4a16_mma<8,1,8,4,1,2>", "w4a16_mma<8,1,16,4,1,4>", "w4a16_mma<8,1,8,4>", "w4a16_mma<8,1,8,4,1>",
           "w4a16_mma<8,1,16,4,1,2>")
_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


class ToolMissing(RuntimeError):
    """libnvrtc or cuobjdump is not installed."""


def libnvrtc() -> ctypes.CDLL:
    """libnvrtc from the ``nvidia-cuda-nvrtc`` package (a namespace package ``nvidia``)."""
    try:
        import nvidia
    except ImportError:
        raise ToolMissing("nvidia-cuda-nvrtc is not installed (pyproject's test extra)") from None
    for root in nvidia.__path__:
        found = sorted(Path(root).glob("cu*/lib/libnvrtc.so*"))
        if found:
            return ctypes.CDLL(str(found[0]))
    raise ToolMissing("nvidia-cuda-nvrtc is installed but holds no libnvrtc")


def cuobjdump() -> Path:
    """Triton's bundled cuobjdump."""
    try:
        import triton
    except ImportError:
        raise ToolMissing("triton is not installed (it bundles cuobjdump)") from None
    found = sorted(Path(triton.__file__).parent.glob("backends/nvidia/bin/cuobjdump"))
    if not found:
        raise ToolMissing("Triton's bundled cuobjdump not found")
    return found[0]


def disassemble(lib: ctypes.CDLL, name: str, arch: str, source: Path = int4_mma_build.SOURCE_PATH
                ) -> tuple[list[tuple[int, str]], int]:
    """``([(address, instruction)], registers)`` of configuration ``name`` compiled for ``sm_<arch>`` from ``source``
    (the served kernel's by default)."""
    cubin, _ = int4_mma_build.compile_cubin(lib, source.read_text(), name, arch)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([str(cuobjdump()), "-sass", str(path)], capture_output=True, text=True, timeout=60)
        res = subprocess.run([str(cuobjdump()), "-res-usage", str(path)], capture_output=True, text=True, timeout=60)
    regs = re.search(r"REG:(\d+)", res.stdout)
    lines = [(int(m.group(1), 16), m.group(2)) for line in sass.stdout.splitlines() if (m := _INSTR.match(line))]
    return lines, int(regs.group(1)) if regs else 0


def per_block(lines: list[tuple[int, str]]) -> dict[str, int | bool]:
    """Counts for one block of the main loop: the shortest span between consecutive barriers that holds MMAs (the
    steady state; the prologue and the epilogue's spans are longer or hold none). ``loop``: a branch inside the span
    goes back into it, so what a warp issues per block differs from this static count."""
    bars = [i for i, (_, op) in enumerate(lines) if "BAR.SYNC" in op]
    spans = [lines[a + 1:b + 1] for a, b in zip(bars, bars[1:]) if any("HMMA" in op for _, op in lines[a:b])]
    if not spans:
        raise ValueError("no barrier-delimited span with MMAs: not this kernel's main loop")
    span = min(spans, key=len)
    live = [op for _, op in span if not op.startswith("@!PT ")]   # "@!PT": a never-true predicate (ptxas padding)
    count = lambda key: sum(1 for op in live if re.search(rf"(^|\s){key}(\.|\s|$)", op))  # noqa: E731
    first = span[0][0]
    loop = any(first <= int(m.group(1), 16) < addr for addr, op in span if (m := re.search(r"BRA (0x[0-9a-f]+)", op)))
    return {"instructions": len(span), "never_executed": len(span) - len(live), "HMMA": count("HMMA"),
            "LDS": count("LDS"), "LDGSTS": count("LDGSTS"), "loop": loop}


def table(arch: str, names: list[str]) -> str:
    lib = libnvrtc()
    rows = ["| configuration | registers | instructions per block | of them @!PT | HMMA | LDS | LDGSTS | loop inside |",
            "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name in names:
        lines, regs = disassemble(lib, name, arch)
        c = per_block(lines)
        rows.append(f"| `{name}` | {regs} | {c['instructions']} | {c['never_executed']} | {c['HMMA']} | {c['LDS']} | "
                    f"{c['LDGSTS']} | {'yes' if c['loop'] else 'no'} |")
    return (f"sm_{arch}, one warp, one 64-column block of the main loop (static counts; \"loop inside\": part of the "
            f"span repeats or is skipped at run time, so a warp issues a different number):\n\n" + "\n".join(rows) + "\n")


def compare(arch: str, names: list[str], baseline: Path) -> tuple[str, bool]:
    """Whether each configuration compiles to the same instructions from ``baseline`` (e.g. an earlier commit's .cu:
    ``git show REV:model_server/data/int4_mma.cu``) as from today's source: a change meant to leave the measured kernel
    as it was (a template argument whose default takes the old path) must print "same" for every served one."""
    lib = libnvrtc()
    lines, same_all = [], True
    for name in names:
        new = [op for _, op in disassemble(lib, name, arch)[0]]
        old = [op for _, op in disassemble(lib, name, arch, baseline)[0]]
        same = new == old
        same_all &= same
        at = next((i for i, (a, b) in enumerate(zip(new, old)) if a != b), min(len(new), len(old)))
        lines.append(f"sm_{arch} {name}: " + ("same" if same else f"differs from instruction {at} "
                                              f"({len(old)} -> {len(new)} instructions)"))
    return "\n".join(lines) + "\n", same_all


def main(argv: list[str] | None = None) -> int:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=head, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest)
    p.add_argument("--arch", default="90", choices=("80", "86", "89", "90"), help="compute capability (default 90)")
    p.add_argument("--configs", default=",".join(DEFAULT), help="kernel names, comma-separated (Config.name())")
    p.add_argument("--out", type=Path, help="also write the table here")
    p.add_argument("--baseline-source", type=Path, metavar="CU",
                   help="instead: compare each configuration's instructions from this .cu with today's (exit 1 if any "
                        "differs)")
    args = p.parse_args(argv)
    names = [n.strip() for n in re.split(r",(?=w4a16)", args.configs) if n.strip()]
    if args.baseline_source is not None and not args.baseline_source.is_file():
        p.error(f"--baseline-source: no file {args.baseline_source}")
    same = True
    try:
        if args.baseline_source is not None:
            md, same = compare(args.arch, names, args.baseline_source)
        else:
            md = table(args.arch, names)
    except (ToolMissing, RuntimeError, ValueError) as exc:
        print(f"int4_mma_sass: {' '.join(str(exc).split())[:300]}", file=sys.stderr)
        return 2
    print(md, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(md)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
