"""A ``model-server serve`` subprocess for the benchmarks (model_server_throughput.py, steady_state.py,
cold_start_phases.py), and the models it serves: synthesized (``model-server synth``), quantized
with gptqmodel, or written in GPTQ's format (:func:`gptq_checkpoint`); prompts of exact token counts cut from local text.

Owns: starting, waiting for and stopping the server process; building its model directory.
Must NOT: measure anything (the benchmarks do), or import the model server in this process.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from support import NotReady, free_port, stop_process, wait_engine_warm, wait_http_ok


def _console():
    try:
        from rich.console import Console

        return Console(stderr=True)
    except Exception:
        return None


def log(msg: str) -> None:
    c = _console()
    if c is not None:
        from rich.markup import escape

        c.print(f"[bold cyan]bench[/] {escape(msg)}")
    else:
        print(f"bench: {msg}", file=sys.stderr, flush=True)


def synth_into(preset: str, target: Path, seed: int = 0) -> None:
    """``model-server synth target --preset P --seed S`` unless ``target`` already holds a model."""
    if (Path(target) / "config.json").exists():
        return
    subprocess.run([sys.executable, "-m", "model_server", "synth", str(target), "--preset", preset,
                    "--seed", str(seed), "--quiet"], check=True)


def synth_model(preset: str, out: Path, seed: int) -> Path:
    target = out / f"model-{preset}-seed{seed}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        log(f"reusing {target}")
        return target
    log(f"synthesizing {preset} into {target}")
    subprocess.run([sys.executable, "-m", "model_server", "synth", str(target), "--preset", preset,
                    "--seed", str(seed), "--quiet"], check=True)
    return target


def gptq_checkpoint(model_dir: Path, quant: str) -> Path:
    """``model_dir`` written once as a 4-bit GPTQ-format checkpoint next to it (tests/int4_checkpoints.py: group 128,
    symmetric, format ``gptq``; round-to-nearest values, so its speed is GPTQ's and its accuracy is not; ``gptq-act``
    with act order), which the fast engine repacks onto the ``int4`` kernels at load."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.int4_checkpoints import write_gptq

    dst = model_dir.parent / f"{model_dir.name}-{quant}"
    if not (dst / "config.json").is_file():
        if dst.exists():
            import shutil
            shutil.rmtree(dst)
        write_gptq(model_dir, dst, group_size=128, fmt="gptq", sym=True, desc_act=quant == "gptq-act")
        log(f"{quant}: wrote {dst}")
    return dst


def make_prompts(model_dir: Path, n: int, prompt_tokens: int) -> list[list[int]]:
    """``n`` distinct prompts of exactly ``prompt_tokens`` ids, cut from local text."""
    import sysconfig

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join(p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:40])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    special = set(tok.all_special_ids)
    ids = [i for i in ids if i not in special]
    need = n * prompt_tokens
    while len(ids) < need:
        ids = ids + ids
    return [ids[i * prompt_tokens:(i + 1) * prompt_tokens] for i in range(n)]


def maybe_make_gptq(model_dir: Path, out: Path, prompts_text: list[str]) -> tuple[Path | None, str | None]:
    """Quantize with gptqmodel (4 bit, group 128) when it imports; (dir, None) or (None, reason)."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    try:
        from gptqmodel import GPTQModel, QuantizeConfig
    except Exception as exc:
        return None, f"gptqmodel not importable ({type(exc).__name__})"
    target = out / (model_dir.name + "-gptq")
    if (target / "config.json").is_file():
        return target, None
    try:
        log("quantizing with gptqmodel (4 bit, group 128)")
        m = GPTQModel.load(str(model_dir), QuantizeConfig(bits=4, group_size=128, desc_act=False))
        m.quantize(prompts_text, batch_size=4)
        m.save(str(target))
        return target, None
    except Exception as exc:  # kernels that don't build, no CUDA, ...
        return None, f"gptq quantization failed: {type(exc).__name__}: {str(exc)[:200]}"


class Server:
    def __init__(self, model_dir: Path, quantization: str, engine: str, device: str, max_batch: int,
                 max_total: int, log_path: Path, api_workers: int = 0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "model_server", "serve", str(model_dir), "--port", str(self.port),
               "--device", device, "--quantization", quantization, "--engine", engine,
               "--max-batch", str(max_batch), "--max-total-tokens", str(max_total),
               "--max-concurrent-requests", str(max(256, 2 * max_batch))]
        if api_workers:
            cmd += ["--api-workers", str(api_workers)]
        self.api_workers = api_workers
        self.cmd = cmd
        self.log_file = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Wait for /health and the engine warm (/info `engine_warm`), then return /info; RuntimeError (with the
        log's tail) when it exits first."""
        try:
            wait_http_ok(self.url + "/health", timeout, proc=self.proc, name="server", interval=0.25)
        except NotReady as exc:
            raise RuntimeError(f"{exc}: {self.log_path.read_text(errors='replace')[-1500:]}") from None
        return wait_engine_warm(self.url, timeout)   # serve warms the engine up in the background after /health

    def stop(self) -> None:
        stop_process(self.proc, timeout=60)
        self.log_file.close()
