"""Do graphed and eager prefill passes give the same greedy tokens? (issue 17: graphing the 64-prompt burst)

For each ``--caps`` value (``MODEL_SERVER_FAST_PREFILL_GRAPH_TOKENS``: prefill passes of up to that many padded tokens
run as CUDA graph replays, larger ones eagerly) and each quantization, one engine is built with its graphs captured
before any request (not lazily), then ``--streams`` greedy requests (distinct prompts of ``--prompt-len`` tokens,
``--new-tokens`` each) are submitted together twice: with a cap of at least ``streams x prompt-len`` their prefill is
one graph replay, below it one eager pass. The tokens of every cap are compared with the first cap's, per
quantization, and each engine's two rounds with each other.

  python benchmarks/prefill_graph_agree.py --model-dir /tmp/m1b --quants int4:mma,bf16 --caps 2048,4096 --out DIR
  python benchmarks/prefill_graph_agree.py --preset tiny --quants bf16 --caps 64,256 --streams 8 --prompt-len 16 \\
      --new-tokens 4 --out DIR                                   # CPU smoke (no graphs there: every cap is eager)

Writes ``DIR/prefill_graph_agree.json`` (card, date, command, commit, tokens) and one line per comparison.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_profile import batch_greedy  # noqa: E402
from model_server_process import synth_model  # noqa: E402
from support import default_commit, log, utc_date  # noqa: E402


def tokens_for(quant: str, cap: int, args: argparse.Namespace, model_dir: Path, device: str) -> list[list[list[int]]]:
    """Two rounds of ``args.streams`` concurrent greedy requests on an engine graphing prefill up to ``cap`` tokens."""
    from model_server.engines.fast import from_loaded
    from model_server.loading import load_model

    q, _, kernels = quant.partition(":")
    os.environ.pop("MODEL_SERVER_INT4_KERNELS", None)
    if kernels:
        os.environ["MODEL_SERVER_INT4_KERNELS"] = kernels
    os.environ["MODEL_SERVER_FAST_PREFILL_GRAPH_TOKENS"] = str(cap)
    loaded = load_model(str(model_dir), device, q)
    eng = from_loaded(loaded, max_batch=args.streams, max_total_tokens=args.prompt_len + args.new_tokens + 8)

    async def main(eng: Any) -> list[list[list[int]]]:
        await eng.start()
        try:
            await eng.wait_warm(600)
            return [await batch_greedy(eng, args.streams, args.prompt_len, args.new_tokens) for _ in range(2)]
        finally:
            await eng.stop()
    rounds = asyncio.run(main(eng))
    del eng, loaded              # the weights go before the next engine loads
    if device == "cuda":
        torch.cuda.empty_cache()
    return rounds


def differ(a: list[list[int]], b: list[list[int]]) -> int:
    """Requests whose token lists differ."""
    return sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", type=Path, help="a model directory (e.g. model-server synth's llama-3.2-1b)")
    src.add_argument("--preset", help="synthesize this model_server synth preset into a temporary directory")
    ap.add_argument("--quants", default="int4:mma,bf16", help="comma list, quant[:int4 kernels] (default: %(default)s)")
    ap.add_argument("--caps", default="2048,4096", help="comma list of prefill graph caps in tokens (default: %(default)s)")
    ap.add_argument("--streams", type=int, default=64, help="concurrent requests (default: %(default)s)")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default: %(default)s)")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per request (default: %(default)s)")
    ap.add_argument("--commit", default=None, help="commit to record (default: git HEAD)")
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    args = ap.parse_args(argv)
    try:
        caps = [int(c) for c in args.caps.split(",") if c.strip()]
        quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    except ValueError:
        ap.error(f"--caps must be a comma list of integers, got {args.caps!r}")
    if len(caps) < 2 or not quants or min(caps) < 16 or args.streams < 1 or args.prompt_len < 1 or args.new_tokens < 1:
        ap.error("need two or more --caps of at least 16, one or more --quants, and positive counts")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or synth_model(args.preset, Path(tmp), 0)
        result: dict = {"card": torch.cuda.get_device_name() if device == "cuda" else "cpu", "date": utc_date(),
                        "commit": args.commit or default_commit(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                        "streams": args.streams, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                        "caps": caps, "quants": {}}
        lines = []
        for quant in quants:
            per_cap = {}
            for cap in caps:
                log(f"{quant} cap {cap}")
                per_cap[cap] = tokens_for(quant, cap, args, model_dir, device)
            first = per_cap[caps[0]][0]
            cmp = {str(cap): {"rounds_differ": differ(r[0], r[1]), "vs_first_cap_differ": differ(first, r[0])}
                   for cap, r in per_cap.items()}
            result["quants"][quant] = {"compare": cmp, "tokens": {str(c): r[0] for c, r in per_cap.items()}}
            for cap in caps:
                c = cmp[str(cap)]
                lines.append(f"{quant} cap {cap}: {c['vs_first_cap_differ']} of {args.streams} requests differ from "
                             f"cap {caps[0]}; the engine's two rounds: {c['rounds_differ']} differ")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefill_graph_agree.json").write_text(json.dumps(result, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
