"""transformers' ContinuousBatchingManagers behind the transformers engine: configured, started, replaced.

Owns the managers' configuration (page size, KV blocks, batch tokens; the sampling manager's
per-request processors), one manager per ``do_sample`` setting (``"greedy"``, ``"sample"``) created
on first use and replaced when its loop has died, and, on transformers versions without
``register_result_handler``, the dispatcher threads that read a manager's output queue. It must not
track requests or turn outputs into token events (:mod:`model_server.engines.transformers_engine`
does).
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import math
import threading
import time
from typing import Any, Callable

log = logging.getLogger("model_server.engines.transformers")


def supported_kwargs(fn, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop keyword arguments that this transformers version's ``fn`` doesn't take."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


class ManagerPool:
    """The engine's managers by key; ``deliver(output)`` receives outputs read by a dispatcher thread."""

    def __init__(self, loaded, max_batch: int, max_total_tokens: int, page_size: int,
                 deliver: Callable[[Any], None]) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.max_batch = max_batch
        self.max_total_tokens = max_total_tokens
        self.page_size = page_size
        self.eos_ids = set(loaded.eos_token_ids)
        self._deliver = deliver
        self._managers: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._dispatchers: list[threading.Thread] = []
        self._stop_dispatch = threading.Event()

    def cb_config(self, sampling: bool):
        try:
            from transformers.generation import ContinuousBatchingConfig
        except ImportError:
            try:
                from transformers.generation.configuration_utils import ContinuousBatchingConfig
            except ImportError:  # older transformers: settings travel on the GenerationConfig
                return None
        kwargs: dict[str, Any] = {"page_size": self.page_size, "max_requests_per_batch": self.max_batch}
        if self.loaded.device_type == "cpu":
            blocks = math.ceil(self.max_batch * self.max_total_tokens / self.page_size)
            kwargs.update(num_blocks=max(16, min(blocks, 4096)),
                          max_batch_tokens=max(256, min(4096, self.max_batch * 64)))
        if sampling:
            kwargs["per_request_processors"] = True
        return ContinuousBatchingConfig(**supported_kwargs(ContinuousBatchingConfig, kwargs))

    def generation_config(self, sampling: bool):
        from transformers import GenerationConfig

        gc = GenerationConfig(
            max_new_tokens=64, do_sample=sampling,
            eos_token_id=sorted(self.eos_ids) if self.eos_ids else -1,
            pad_token_id=self.loaded.tokenizer.pad_token_id,
        )
        if sampling:
            # processors are only built for non-default values; requests override them per request
            # (top_k = vocab size means "no top-k"; transformers 5.17 does not clamp larger values)
            gc.temperature, gc.top_p, gc.top_k = 0.999, 0.999, self.vocab_size()
        if self.cb_config(sampling) is None:  # pre-ContinuousBatchingConfig transformers
            gc.num_blocks = max(16, math.ceil(self.max_batch * self.max_total_tokens / self.page_size))
            gc.block_size = self.page_size
            gc.max_batch_tokens = max(256, self.max_batch * 64)
        return gc

    def vocab_size(self) -> int:
        out = getattr(getattr(self.model, "lm_head", None), "out_features", None)
        if out:
            return int(out)
        cfg = self.model.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        return int(cfg.vocab_size)

    def get(self, key: str):
        """The running manager for ``key`` (``"greedy"`` or ``"sample"``), created (blocking) on first use."""
        with self._lock:
            mgr = self._managers.get(key)
            if mgr is not None and hasattr(mgr, "is_running") and not mgr.is_running():
                # its loop died (a fatal error fails every request it held): start a fresh one
                log.warning("continuous batching manager %r stopped; starting a new one", key)
                self._managers.pop(key, None)
                try:
                    mgr.stop(block=False)
                except Exception:
                    pass
                mgr = None
            if mgr is not None:
                return mgr
            sampling = key == "sample"
            gc = self.generation_config(sampling)
            cbc = self.cb_config(sampling)
            init = self.model.init_continuous_batching
            kwargs: dict[str, Any] = {"generation_config": gc}
            if cbc is not None:
                kwargs["continuous_batching_config"] = cbc
            mgr = init(**supported_kwargs(init, kwargs))
            mgr.start()
            self._managers[key] = mgr
            if not hasattr(mgr, "register_result_handler"):
                t = threading.Thread(target=self._dispatch_loop, args=(mgr,), daemon=True,
                                     name=f"cb-dispatch-{key}")
                t.start()
                self._dispatchers.append(t)
            return mgr

    def _dispatch_loop(self, mgr) -> None:
        """Fallback for transformers without register_result_handler: route queue outputs."""
        while not self._stop_dispatch.is_set():
            try:
                out = mgr.get_result(timeout=0.05)
            except Exception:
                time.sleep(0.05)
                continue
            if out is not None:
                self._deliver(out)

    def existing(self, key: str):
        """The manager for ``key`` if one was created (never creates one)."""
        return self._managers.get(key)

    async def stop(self) -> None:
        """Stop the dispatcher threads and every manager (bounded; a failure is logged, never raised)."""
        self._stop_dispatch.set()
        for mgr in list(self._managers.values()):
            try:
                await asyncio.to_thread(mgr.stop, block=True, timeout=5)
            except Exception as exc:  # never let shutdown crash
                log.warning("manager stop failed: %s", exc)
        self._managers.clear()
