"""Server state shared by the routes: lifecycle state, the loaded model, the engine, limits, metrics; and the serve
command's runtime built from its arguments, with the process's start stamped."""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from model_server import __version__ as VERSION
from model_server.engines.base import Engine
from model_server.generation import ApiError
from model_server.loading import LoadedModel
from model_server.metrics import ServerMetrics

STATES = ("starting", "loading", "warming", "ready", "draining", "failed")


@dataclass
class Limits:
    max_batch: int
    max_concurrent_requests: int
    max_input_tokens: int | None = None     # resolved once the model is loaded
    max_total_tokens: int | None = None
    max_input_bytes: int | None = None      # api_common.prompt_byte_bound(tokenizer, max_input_tokens)
    max_new_tokens_default: int = 20


@dataclass
class Runtime:
    model_id: str
    served_name: str
    engine_name: str                         # requested engine (auto|fast|transformers) until resolved
    limits: Limits
    state: str = "starting"
    loaded: LoadedModel | None = None
    engine: Engine | None = None
    in_flight: int = 0
    startup: dict[str, float | None] = field(default_factory=lambda: {
        "process_start": None, "load_start": None, "load_end": None, "warmup_end": None, "ready": None})
    load_energy_joules: float | None = None
    compile_cache: dict[str, Any] | None = None  # compile_cache.SeedResult.as_dict(): the folder, what a seed copied
    bytecode_cache: dict[str, Any] | None = None  # bytecode_cache.BytecodeCache.as_dict(): where torch's .pyc come from
    weights_prefetch: Any = None         # weights_prefetch.Prefetch: the checkpoint read into the page cache at start
    error: str | None = None
    metrics: ServerMetrics = field(init=False)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # tokenization and chat templates run here, off the event loop (api_common.run_tokenizer)
    tokenizer_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer"))

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(lambda: self.engine.stats() if self.engine is not None else None)

    # ------------------------------------------------------------------ helpers
    def set_state(self, state: str) -> None:
        assert state in STATES, state
        self.state = state
        if state == "ready":
            self.startup["ready"] = time.time()
        self.metrics.ready.set(1 if state == "ready" else 0)

    def names(self) -> set[str]:
        import os

        names = {self.served_name, self.model_id, os.path.basename(self.model_id.rstrip("/"))}
        return {n for n in names if n}

    def check_ready(self) -> None:
        """Raise a 503 ApiError unless the server can take a generate request now."""
        if self.state != "ready" or self.engine is None or self.loaded is None:
            why = {"draining": "server is shutting down"}.get(self.state, f"model is not ready ({self.state})")
            raise ApiError(503, why, kind="unavailable")
        if self.in_flight >= self.limits.max_concurrent_requests:
            raise ApiError(429, f"too many concurrent requests (limit {self.limits.max_concurrent_requests})",
                           kind="overloaded")

    def info(self) -> dict[str, Any]:
        lm = self.loaded
        return {
            "model_id": self.served_name,
            # one model is served: the OpenAI routes accept any `model` name (as TGI does)
            "model_names": sorted(self.names()),
            "accepts_any_model_name": True,
            "model_path": self.model_id,
            "model_sha": None,
            "model_dtype": lm.dtype if lm else None,
            "model_device_type": lm.device_type if lm else None,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": self.limits.max_concurrent_requests,
            "max_best_of": 1,
            "max_stop_sequences": 16,
            "max_input_tokens": self.limits.max_input_tokens,
            "max_input_length": self.limits.max_input_tokens,
            "max_input_bytes": self.limits.max_input_bytes,
            "max_total_tokens": self.limits.max_total_tokens,
            "max_batch_size": self.limits.max_batch,
            "version": VERSION,
            "router": "edge-eval model-server",
            "state": self.state,
            "ready": self.state == "ready",
            "error": self.error,
            "architecture": lm.architecture if lm else None,
            "parameters": lm.parameters if lm else None,
            "weight_bytes": lm.weight_bytes if lm else None,
            "quantization": lm.quantization if lm else None,
            # INT4 linears (--quantization int4, or a GPTQ checkpoint repacked): model_server.int4's kernel choice
            "int4_kernel": getattr(lm.model, "int4_kernel", None) if lm else None,
            "int4_kernel_reason": getattr(lm.model, "int4_kernel_reason", None) if lm else None,
            "dtype": lm.dtype if lm else None,
            "engine": self.engine.name if self.engine is not None else None,
            "devices": lm.devices if lm else [],
            "synthetic": lm.synthetic if lm else None,
            "context_length": lm.context_length if lm else None,
            "startup": dict(self.startup),
            # how the model and tokenizer were built: "native" (model_server.native) | "direct" | "from_pretrained"
            "load_path": lm.load_path if lm else None,
            "tokenizer": ("native" if getattr(lm.tokenizer, "native", False) else "transformers") if lm else None,
            "transformers_imported": "transformers" in sys.modules,     # in this process, now
            # False while the fast engine's background warm-up runs (requests are served eagerly until then)
            "engine_warm": (bool(self.engine.stats().extra.get("warm", 1.0)) if self.engine is not None else None),
            # the fast engine's decode attention: its Triton kernel (MODEL_SERVER_FAST_DECODE_ATTN=1, passed its check)
            "decode_attn_kernel": (bool(self.engine.stats().extra.get("decode_attn_kernel", 0.0))
                                   if self.engine is not None else None),
            # its greedy pick as two Triton kernels (engines/fast/greedy_kernel.py; CUDA, passed its check)
            "pick_kernel": (bool(self.engine.stats().extra.get("pick_kernel", 0.0)) if self.engine is not None else None),
            # its residual add + RMSNorm as one Triton kernel (engines/fast/norm_kernel.py; CUDA by default)
            "norm_kernel": (bool(self.engine.stats().extra.get("norm_kernel", 0.0)) if self.engine is not None else None),
            # linears whose one-row steps run the bf16 GEMV (model_server/gemv_bf16.py; CUDA, passed its check)
            "gemv_linears": (int(self.engine.stats().extra.get("gemv_linears", 0.0)) if self.engine is not None else None),
            "load_energy_joules": self.load_energy_joules,
            "compile_cache": self.compile_cache,
            "bytecode_cache": self.bytecode_cache,
            "weights_prefetch": self.weights_prefetch.as_dict() if self.weights_prefetch is not None else None,
            "switch_interval_seconds": sys.getswitchinterval(),   # configured (MODEL_SERVER_SWITCH_INTERVAL_S)
        }


def process_start_epoch() -> float:
    # /proc start ticks against CLOCK_BOOTTIME: ~10 ms precise. (psutil's create_time adds the
    # integer boot time from /proc/stat, so it can be up to 1 s early.)
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        since_start = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return time.time() - since_start
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil

        return float(psutil.Process(os.getpid()).create_time())
    except Exception:
        return time.time()


def runtime_from_args(cls: type[Runtime], args: argparse.Namespace) -> Runtime:
    """The serve command's runtime (name, engine, limits from the arguments; process start stamped)."""
    from model_server.compat import default_served_name

    runtime = cls(model_id=args.model, served_name=args.model_name or default_served_name(args.model),
                  engine_name=args.engine,
                  limits=Limits(max_batch=args.max_batch, max_concurrent_requests=args.max_concurrent_requests,
                                max_new_tokens_default=args.max_new_tokens_default))
    runtime.startup["process_start"] = process_start_epoch()
    return runtime
