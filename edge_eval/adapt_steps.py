"""The phases of ``edge-eval adapt``, each inside its own energy window: train (LoRA on the
checkpoint dtype, or QLoRA on a bitsandbytes NF4 base), merge (``merge_and_unload`` into the
full-precision base, saved as a servable model), quantize (the merged model reloaded through
bitsandbytes NF4 / int8 and saved). Writes adaptation.json after every phase."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from edge_eval.adapt import JOULES_PER_KWH, now_utc, phase_record
from edge_eval.energy_window import EnergyWindow, make_reader
from edge_eval.errors import UsageError
from edge_eval.results import atomic_write_json
from edge_eval.tasks.base import Item, TaskSpec
from edge_eval.training import build_examples, lora_model, train


def _load(model_id: str, device: str, dtype_name: str, nf4: bool) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    if nf4:
        from transformers import BitsAndBytesConfig
        compute = getattr(torch, dtype_name if dtype_name != "float32" else "bfloat16")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)
    elif device == "cuda":
        kwargs["dtype"] = getattr(torch, dtype_name)
    else:
        kwargs["dtype"] = "auto"
    if model_id.startswith(("/", "./", "../", "~")) and not Path(model_id).expanduser().exists():
        raise UsageError(f"model directory not found: {model_id}")      # not a hub id: say so, not "Repo id must ..."
    try:
        tok = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id, device_map=device, **kwargs)
    except Exception as exc:                              # noqa: BLE001 - one line for the user
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UsageError(f"cannot load {model_id}: {first}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def adapt(args: argparse.Namespace, task: TaskSpec, items: list[Item], data: str, out: Path,
          device: str, dtype_name: str, capability: tuple[int, int] | None) -> dict[str, Any]:
    import torch

    console = Console(stderr=True, quiet=args.quiet)
    reader = make_reader(device, args.estimated_watts)
    qlora = args.method == "qlora"
    model, tok = _load(args.model, device, dtype_name, nf4=qlora)
    examples = build_examples(tok, task, items, args.max_length)
    model = lora_model(model, args.rank, args.alpha, 0.05, quantized=qlora)
    autocast = None
    if device == "cuda" and dtype_name != "float32":
        # mixed precision: frozen base in the compute dtype, LoRA weights in float32 under autocast
        autocast = getattr(torch, dtype_name)
        for prm in model.parameters():
            if prm.requires_grad:
                prm.data = prm.data.float()
    doc: dict[str, Any] = {
        "schema": 1, "kind": "edge-eval.adaptation", "model": args.model, "method": args.method,
        "task": task.name, "data": data, "n_examples": len(examples), "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "compute_capability": list(capability) if capability else None,
        # QLoRA on CPU: the NF4 layers compute in bfloat16 (see _load)
        "dtype": "bfloat16" if qlora and dtype_name == "float32" else dtype_name,
        "base_quantization": "nf4" if qlora else "none",
        "lora": {"rank": args.rank, "alpha": args.alpha, "dropout": 0.05,
                 "targets": sorted(model.peft_config["default"].target_modules)},
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "energy_source": reader.source,
        "energy_source_class": "measured" if reader.source == "nvml" else "estimated",
        "usd_per_kwh": args.usd_per_kwh, "started_at": now_utc(), "phases": {},
    }
    progress = Progress(TextColumn("adapt {task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), TextColumn("loss {task.fields[loss]}"),
                        console=console, disable=args.quiet)
    with progress:
        bar = progress.add_task(args.method, total=args.steps, loss="-")
        with EnergyWindow(reader, "train") as w:
            stats = train(model, examples, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          pad_id=int(tok.pad_token_id), device=device, seed=args.seed,
                          autocast_dtype=autocast,
                          on_step=lambda s, l: progress.update(bar, completed=s, loss=f"{l:.3f}"))
            if device == "cuda":
                torch.cuda.synchronize()
    assert w.result is not None
    if device == "cuda":     # the paper's "QLoRA saves ~60% memory", measured: training's peak
        doc["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated())
    doc["phases"]["train"] = phase_record(w.result.joules, w.result.seconds, args.usd_per_kwh)
    doc.update(tokens=stats.tokens, target_tokens=stats.target_tokens,
               first_loss=stats.first_loss, last_loss=stats.last_loss)
    adapter_dir = out / "adapter"
    model.save_pretrained(adapter_dir)
    tok.save_pretrained(adapter_dir)
    doc["adapter_path"] = str(adapter_dir)
    _finish(doc, out)
    del model
    if args.merge:
        merged = out / "merged"
        with EnergyWindow(reader, "merge") as w:
            _merge(args.model, adapter_dir, merged, device, dtype_name)
        assert w.result is not None
        doc["phases"]["merge"] = phase_record(w.result.joules, w.result.seconds, args.usd_per_kwh)
        doc["merged_path"] = str(merged)
        _finish(doc, out)
        if args.quantize:
            qdir = out / f"merged-{args.quantize}"
            with EnergyWindow(reader, "quantize") as w:
                _quantize(merged, qdir, args.quantize, device, dtype_name)
            assert w.result is not None
            doc["phases"]["quantize"] = phase_record(w.result.joules, w.result.seconds, args.usd_per_kwh)
            doc["quantized_path"] = str(qdir)
            _finish(doc, out)
    p = doc["phases"]["train"]
    console.print(f"adapt: {args.steps} steps, loss {stats.first_loss:.3f} -> {stats.last_loss:.3f}; "
                  f"train {p['joules']:.1f} J in {p['seconds']:.1f} s ({doc['energy_source']}); "
                  f"total {doc['joules']:.1f} J -> {out / 'adaptation.json'}")
    return doc


def _finish(doc: dict[str, Any], out: Path) -> None:
    """Totals over the phases so far (C_train for N_break), written atomically."""
    phases = doc["phases"].values()
    doc["joules"] = doc["phases"]["train"]["joules"]          # training energy alone
    doc["total_joules"] = sum(p["joules"] for p in phases)    # train + merge + quantize
    doc["seconds"] = sum(p["seconds"] for p in phases)
    doc["kwh"] = doc["total_joules"] / JOULES_PER_KWH
    doc["usd"] = doc["kwh"] * doc["usd_per_kwh"]
    doc["updated_at"] = now_utc()
    atomic_write_json(out / "adaptation.json", doc)


def _merge(base: str, adapter_dir: Path, merged: Path, device: str, dtype_name: str) -> None:
    from peft import PeftModel

    model, tok = _load(base, device, dtype_name, nf4=False)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    if merged.exists():
        shutil.rmtree(merged)
    model.save_pretrained(merged)
    tok.save_pretrained(merged)
    _copy_marker(base, merged)


def _quantize(merged: Path, qdir: Path, method: str, device: str, dtype_name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if method == "nf4":
        compute = getattr(torch, dtype_name if dtype_name != "float32" else "bfloat16")
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    else:
        qc = BitsAndBytesConfig(load_in_8bit=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(merged), device_map=device, quantization_config=qc)
        if qdir.exists():
            shutil.rmtree(qdir)
        model.save_pretrained(qdir)
    except Exception as exc:                              # noqa: BLE001
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UsageError(f"--quantize {method} failed on {device}: {first} "
                         "(bitsandbytes quantization may need a GPU)") from None
    AutoTokenizer.from_pretrained(str(merged)).save_pretrained(qdir)


def _copy_marker(base: str, merged: Path) -> None:
    """Keep model-server's synthetic marker (config.json ``edge_eval_synthetic``) on the merge."""
    import json

    src = Path(base) / "config.json"
    dst = merged / "config.json"
    try:
        cfg = json.loads(src.read_text())
        if cfg.get("edge_eval_synthetic"):
            new = json.loads(dst.read_text())
            new["edge_eval_synthetic"] = True
            dst.write_text(json.dumps(new, indent=2))
    except (OSError, ValueError):
        pass
