"""``edge-eval adapt``: LoRA / QLoRA adaptation with measured energy, written to adaptation.json.

    edge-eval adapt MODEL --method lora|qlora --task rag --data builtin:rag:train --out DIR
                    [--steps N] [--merge] [--quantize nf4|int8] [--compute-dtype fp16|bf16]

Writes ``DIR/adapter`` (peft), ``DIR/merged`` with ``--merge`` (a servable model), ``DIR/merged-nf4``
(or ``-int8``) with ``--quantize``, and ``DIR/adaptation.json``: joules (training + merge +
quantize, each also on its own), seconds, kWh, USD at ``--usd-per-kwh``, steps, tokens, device,
dtype, energy source. The proxy reads it as C_train (``economics.adaptation_results_path``).
On a GPU the compute dtype defaults to fp16 below compute capability 8.0 and bf16 from 8.0
(:func:`model_server.quantization.default_compute_dtype`); on CPU training runs in float32.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from edge_eval.errors import UsageError, missing_package

JOULES_PER_KWH = 3.6e6
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "adapt", help="LoRA/QLoRA fine-tune with measured energy (adaptation.json)",
        description="Fine-tune MODEL with a peft LoRA adapter (QLoRA: on a bitsandbytes NF4 base) "
                    "on a task's data, measuring the energy of training, merging and quantizing. "
                    "See docs/evaluation.md.")
    p.add_argument("model", help="a local Hugging Face model directory (or hub id)")
    p.add_argument("--method", choices=("lora", "qlora"), default="lora", help="default lora")
    p.add_argument("--task", required=True, help="rag, summarization or chat")
    p.add_argument("--data", default=None, help="training data (default builtin:TASK:train)")
    p.add_argument("--limit", type=int, default=2000, help="training items (default 2000)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate (default 3e-3)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16, the paper's)")
    p.add_argument("--alpha", type=int, default=16, help="LoRA alpha (default 16)")
    p.add_argument("--max-length", type=int, default=512, help="longest example in tokens")
    p.add_argument("--merge", action="store_true", help="merge the adapter and save DIR/merged")
    p.add_argument("--quantize", choices=("nf4", "int8"), default=None,
                   help="also save the merged model quantized with bitsandbytes (needs --merge)")
    p.add_argument("--compute-dtype", choices=("fp16", "bf16"), default=None,
                   help="GPU compute dtype (default: fp16 below compute capability 8.0, else bf16)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--usd-per-kwh", type=float, default=0.12, help="electricity price (default 0.12)")
    p.add_argument("--estimated-watts", type=float, default=65.0,
                   help="CPU estimate: watts per busy core (no GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def resolve_compute_dtype(requested: str | None, device: str, capability: tuple[int, int] | None) -> str:
    """The torch dtype name training computes in: the request, else fp16 below compute capability
    8.0 / bf16 from 8.0 on a GPU, float32 on CPU."""
    from model_server.quantization import default_compute_dtype

    if requested:
        return DTYPES[requested]
    if device != "cuda":
        return "float32"
    return default_compute_dtype(capability)


def run(args: argparse.Namespace) -> int:
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        raise missing_package("torch and transformers", "server") from None
    from model_server.quantization import import_bitsandbytes

    try:
        import_bitsandbytes()       # before peft, which imports it when it is installed (no hub kernel download)
        bnb_error = None
    except Exception as exc:
        bnb_error = exc
    try:
        import peft  # noqa: F401
    except ImportError:
        raise missing_package("peft") from None
    from edge_eval.tasks import get_task, load_items

    task = get_task(args.task)
    if args.steps < 1 or args.batch_size < 1:
        raise UsageError("--steps and --batch-size must be >= 1")
    if args.quantize and not args.merge:
        raise UsageError("--quantize quantizes the merged model: add --merge")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device")
    if (args.method == "qlora" or args.quantize) and bnb_error is not None:
        raise missing_package("bitsandbytes", "server") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    cap = torch.cuda.get_device_capability() if device == "cuda" else None
    dtype_name = resolve_compute_dtype(args.compute_dtype, device, cap)
    data = args.data or f"builtin:{task.name}:train"
    items = load_items(data, task, args.limit, seed=args.seed, default_split="train")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from edge_eval.adapt_steps import adapt
    adapt(args, task, items, data, out, device, dtype_name, cap)
    return 0


def phase_record(joules: float, seconds: float, usd_per_kwh: float) -> dict[str, Any]:
    """{joules, seconds, kwh, usd}: kWh = J / 3.6e6; USD = kWh x price."""
    kwh = joules / JOULES_PER_KWH
    return {"joules": joules, "seconds": seconds, "kwh": kwh, "usd": kwh * usd_per_kwh}


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
