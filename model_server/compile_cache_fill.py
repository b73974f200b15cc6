"""``model-server compile-cache fill``: fill a compile cache on the target card, to ship in a container image.

Owns driving one ``model-server serve`` child with its compile cache in the output folder until everything a
server compiles has been compiled: the load's kernel pre-warm, the background warm-up's fused ops, then requests
at every batch size up to ``--max-batch`` and at several prompt lengths (the INT4 and attention kernels compile
one variant per tile size, chosen by the step's rows), then a clean stop and the manifest
(:func:`model_server.compile_cache.write_manifest`). The child is the server users run, with the same switches,
so the cache's keys are the ones a served start looks up. Must NOT copy caches (:mod:`.compile_cache` seeds).
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from model_server import compile_cache

PROMPT_WORDS = (4, 16, 60, 250, 1000)  # prompt lengths (words of the filler, capped by the server's limit)
NEW_TOKENS = 8


class FillError(Exception):
    """A fill that cannot finish; the message is one line."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to and including ``max_batch``."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def _tail(log_path: Path) -> str:
    try:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


class _Child:
    """The ``serve`` child, its log file and its base URL; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, model: str, out: Path, serve_args: list[str], log_dir: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / "serve.log"
        env = {k: v for k, v in os.environ.items()
               if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "MODEL_SERVER_COMPILE_CACHE_SEED")}
        env["MODEL_SERVER_COMPILE_CACHE"] = str(out)
        env.setdefault("MODEL_SERVER_FAST_PRECOMPILE_INT4", "1")   # every INT4 GEMM variant, not only those met
        cmd = [sys.executable, "-m", "model_server", "serve", model, "--host", "127.0.0.1",
               "--port", str(self.port), *serve_args]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def failed(self) -> str | None:
        code = self.proc.poll()
        return None if code is None else f"the server exited with code {code}: {_tail(self.log_path)}"

    def stop(self, timeout_s: float = 60.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


async def _poll(session, url: str, child: _Child, until: Callable[[int, dict], bool], deadline: float,
                what: str) -> dict[str, Any]:
    while True:
        why = child.failed()
        if why:
            raise FillError(why)
        try:
            async with session.get(url) as resp:
                body = await resp.json(content_type=None) if resp.content_type == "application/json" else {}
                if until(resp.status, body):
                    return body
        except (OSError, asyncio.TimeoutError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise FillError(f"timed out waiting for {what} (see {child.log_path})")
        await asyncio.sleep(0.25)


async def _generate(session, url: str, words: int) -> None:
    body = {"inputs": " ".join(["edge"] * words), "parameters": {"max_new_tokens": NEW_TOKENS}}
    async with session.post(f"{url}/generate", json=body) as resp:
        if resp.status != 200:
            raise FillError(f"POST /generate answered {resp.status}: {(await resp.text())[:200]}")


async def _drive(child: _Child, timeout_s: float, say: Callable[[str], None]) -> dict[str, Any]:
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=max(30.0, timeout_s))) as session:
        say("loading the model")
        await _poll(session, f"{child.url}/health", child, lambda s, b: s == 200, deadline, "the model to load")
        say("compiling (the background warm-up)")
        info = await _poll(session, f"{child.url}/info", child, lambda s, b: bool(b.get("engine_warm", True)),
                           deadline, "the warm-up")
        max_input = int(info.get("max_input_tokens") or 64)
        sizes = batch_sizes(int(info.get("max_batch_size") or 1))
        for n in sizes:
            say(f"requests at batch {n} of {sizes[-1]}")
            await asyncio.gather(*(_generate(session, child.url, PROMPT_WORDS[0]) for _ in range(n)))
        for words in sorted({max(1, min(w, max_input // 4)) for w in PROMPT_WORDS[1:]}):  # a word: a few tokens
            say(f"prompts of {words} words, alone and {sizes[-1]} at once")   # prefills of several row counts
            await _generate(session, child.url, words)
            await asyncio.gather(*(_generate(session, child.url, words) for _ in range(sizes[-1])))
        return await _poll(session, f"{child.url}/info", child, lambda s, b: bool(b.get("engine_warm", True)),
                           deadline, "the warm-up")


def fill(model: str, out: str | Path, serve_args: list[str], timeout_s: float = 1800.0,
         say: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Fill ``out`` (created if missing; files already there are kept) by serving ``model`` with ``serve_args``;
    returns the manifest written. Raises :class:`FillError` (one line) when the server fails or times out."""
    out_dir = Path(out).expanduser().resolve()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise FillError(f"cannot write to {out_dir}: {exc.strerror or exc}") from None
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="compile-cache-fill-") as tmp:
        child = _Child(model, out_dir, serve_args, Path(tmp))
        try:
            info = asyncio.run(_drive(child, timeout_s, say))
        except BaseException:
            child.stop(10.0)
            raise
        say("stopping the server")
        code = child.stop()
        if code not in (0, -signal.SIGTERM):
            raise FillError(f"the server stopped with code {code}: {_tail(child.log_path)}")
    devices = info.get("devices") or []
    facts = {"device": (devices[0].get("name") if devices else None) or info.get("model_device_type"),
             "model": os.path.basename(str(model).rstrip("/")), "quantization": info.get("quantization"),
             "dtype": info.get("dtype"), "engine": info.get("engine"), "int4_kernel": info.get("int4_kernel"),
             "decode_attn_kernel": info.get("decode_attn_kernel"), "serve_args": list(serve_args),
             "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
             "fill_seconds": round(time.monotonic() - t0, 1)}
    return compile_cache.write_manifest(out_dir, facts)
