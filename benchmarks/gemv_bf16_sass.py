"""Static checks of the bf16 GEMV kernel (model_server/data/gemv_bf16.cu) per configuration, without a GPU.

NVRTC compiles each configuration of :data:`gemv_bf16.CONFIGS` (or ``--configs``) as the server does and Triton's
cuobjdump reads it back (both found as ``int4_mma_sass.py`` finds them): per configuration its registers, stack and
local memory (a spill shows as stack), or with ``--baseline-source OLD.cu`` whether it compiles to the same
instructions from OLD.cu (e.g. ``git show REV:model_server/data/gemv_bf16.cu``) as from today's source: the one-row
configurations must print "same" after a change meant to leave the measured kernel as it was.

  python3 benchmarks/gemv_bf16_sass.py [--arch 90] [--configs 'gemv_bf16<1, 8, 4>;gemv_bf16<1, 8, 2, 8>']
  python3 benchmarks/gemv_bf16_sass.py --baseline-source OLD.cu --rows 1      # exit 1 if any differs
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import int4_mma_sass  # noqa: E402
from model_server import gemv_bf16, int4_mma_build  # noqa: E402


def usage(lib, name: str, arch: str) -> str:
    """``REG:n STACK:n SHARED:n LOCAL:n`` of ``name`` compiled for ``sm_<arch>`` from today's source."""
    cubin, _ = int4_mma_build.compile_cubin(lib, gemv_bf16.SOURCE_PATH.read_text(), name, arch)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(int4_mma_sass.cuobjdump()), "-res-usage", str(path)], capture_output=True,
                             text=True, timeout=60).stdout
    found = re.search(r"REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+", out)
    return found.group(0) if found else "no resource usage"


def main(argv: list[str] | None = None) -> int:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=head, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest)
    p.add_argument("--arch", default="90", choices=("80", "86", "89", "90"))
    p.add_argument("--configs", help="kernel names separated by ';' (default: every configuration of CONFIGS)")
    p.add_argument("--rows", type=int, help="only the configurations for this many rows of x")
    p.add_argument("--baseline-source", type=Path, metavar="CU")
    args = p.parse_args(argv)
    names = ([n.strip() for n in args.configs.split(";") if n.strip()] if args.configs else
             [c.name() for c in gemv_bf16.CONFIGS if args.rows is None or c.rows == args.rows])
    same_all = True
    try:
        lib = int4_mma_sass.libnvrtc()
        for name in names:
            if args.baseline_source is None:
                print(f"sm_{args.arch} {name}: {usage(lib, name, args.arch)}")
                continue
            new = [op for _, op in int4_mma_sass.disassemble(lib, name, args.arch, gemv_bf16.SOURCE_PATH)[0]]
            old = [op for _, op in int4_mma_sass.disassemble(lib, name, args.arch, args.baseline_source)[0]]
            same_all &= new == old
            print(f"sm_{args.arch} {name}: " + ("same" if new == old else f"differs ({len(old)} -> {len(new)} "
                                                                          "instructions)"))
    except (int4_mma_sass.ToolMissing, RuntimeError) as exc:
        print(f"gemv_bf16_sass: {' '.join(str(exc).split())[:300]}", file=sys.stderr)
        return 2
    return 0 if same_all else 1


if __name__ == "__main__":
    sys.exit(main())
