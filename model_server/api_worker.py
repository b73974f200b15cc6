"""One API worker process of ``serve --api-workers N`` (started by :mod:`model_server.api_workers`).

Runs the ordinary aiohttp app (TGI + OpenAI routes, /health, /info, /metrics, /energy) on the
server's host:port with SO_REUSEPORT, with a :class:`~model_server.remote_engine.RemoteEngine` in
place of the engine. It loads only the tokenizer (tokenization, chat templates, detokenization run
here), before it listens, so no worker accepts a connection it cannot serve once the engine is
ready; the state, limits and /info come from the engine process. Its state is the engine process's,
except "failed" once the engine process is gone; it
then ends its live streams with an error and exits (status 1). On ``exit`` from the engine process
or SIGTERM it refuses new requests, lets its own finish (bounded by --drain-timeout) and exits 0;
SIGINT is left to the engine process. It must not load the model nor decide the server's lifecycle.

Usage (internal): ``python -m model_server.api_worker CONFIG_JSON`` with the socketpair's fd in it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from types import SimpleNamespace
from typing import Any

from aiohttp import web

from model_server import ipc
from model_server.app import build_app
from model_server.energy_route import ENERGY_SERVICE_KEY, register_energy_routes
from model_server.loading import LoadedModel
from model_server.remote_engine import RemoteEngine
from model_server.runtime import Limits, Runtime

log = logging.getLogger("model_server.api_worker")


class WorkerRuntime(Runtime):
    """A runtime whose /info is the engine process's, with this worker's state."""

    remote_info: dict[str, Any] | None = None
    api_workers: int = 0

    def info(self) -> dict[str, Any]:
        base = dict(self.remote_info) if self.remote_info else super().info()
        base.update(state=self.state, ready=self.state == "ready", error=self.error,
                    api_workers=self.api_workers, api_worker_pid=os.getpid())
        return base


class Worker:
    def __init__(self, cfg: dict[str, Any]) -> None:
        from model_server.compat import default_served_name

        self.cfg = cfg
        self.runtime = WorkerRuntime(
            model_id=cfg["model"], served_name=cfg["model_name"] or default_served_name(cfg["model"]),
            engine_name="fast", limits=Limits(max_batch=cfg["max_batch"],
                                              max_concurrent_requests=cfg["max_concurrent_requests"],
                                              max_new_tokens_default=cfg["max_new_tokens_default"]))
        self.runtime.api_workers = int(cfg["api_workers"])
        self.tokenizer: Any = None
        self.remote: dict[str, Any] = {"state": "starting"}
        self.lost = False
        self.exit_code: int | None = None
        self.done = asyncio.Event()

    # ------------------------------------------------------------------ state
    def apply(self) -> None:
        rt, remote = self.runtime, self.remote
        rt.error = remote.get("error")
        rt.remote_info = remote.get("info")
        if remote.get("limits"):
            for k, v in remote["limits"].items():
                if k not in ("max_concurrent_requests",):     # that one applies per worker
                    setattr(rt.limits, k, v)
        info = rt.remote_info or {}
        if rt.remote_info:
            rt.startup = dict(info.get("startup") or rt.startup)
        if rt.loaded is None and self.tokenizer is not None and remote.get("model"):
            m = remote["model"]
            stub = SimpleNamespace(config=SimpleNamespace(vocab_size=m["vocab_size"]),
                                   generation_config=SimpleNamespace(do_sample=m["do_sample"],
                                                                     temperature=m["temperature"]))
            rt.loaded = LoadedModel(
                model=stub, tokenizer=self.tokenizer, model_id=rt.model_id, device_type=info.get("model_device_type"),
                dtype=info.get("dtype"), quantization=info.get("quantization"), architecture=info.get("architecture"),
                parameters=info.get("parameters") or 0, weight_bytes=info.get("weight_bytes") or 0,
                context_length=info.get("context_length") or 0, synthetic=bool(info.get("synthetic")),
                devices=info.get("devices") or [])
            rt.metrics.weight_bytes.set(rt.loaded.weight_bytes)
            s = rt.startup
            if s.get("load_start") and s.get("load_end"):
                rt.metrics.load_seconds.set(s["load_end"] - s["load_start"])
            if info.get("load_energy_joules") is not None:
                rt.metrics.load_energy.set(info["load_energy_joules"])
        state = remote.get("state", "starting")
        if state == "ready" and rt.loaded is None:
            state = "loading"                  # our own tokenizer is not loaded yet
        if self.lost:
            state = "failed"
            rt.error = rt.error or "the engine process exited"
        if self.exit_code is not None and state != "failed":
            state = "draining"
        if state != rt.state:
            rt.set_state(state)
            if state == "draining" and self.exit_code is None:
                asyncio.get_running_loop().create_task(self._report_drained())

    async def _report_drained(self) -> None:
        """Tell the engine process once this worker has no request left (it stops the engine after)."""
        while self.runtime.in_flight > 0:
            await asyncio.sleep(0.02)
        engine = self.runtime.engine
        if isinstance(engine, RemoteEngine) and not engine.lost:
            ipc.send(engine.writer, ("drained",))

    def on_message(self, msg: tuple[Any, ...]) -> None:
        if msg[0] == "state":
            self.remote = msg[1]
            self.apply()
        elif msg[0] == "exit":
            self.request_exit(0)

    def on_lost(self) -> None:
        if self.exit_code is None:
            log.error("api worker %d: the engine process is gone; exiting", self.cfg["index"])
        self.lost = True
        self.apply()
        self.request_exit(1 if self.exit_code is None else self.exit_code)

    def request_exit(self, code: int) -> None:
        if self.exit_code is None:
            self.exit_code = code
            self.apply()
            self.done.set()

    async def load_tokenizer(self) -> None:
        def load() -> Any:
            from model_server.native.select import load_tokenizer   # native where it matches transformers'

            return load_tokenizer(self.cfg["model"], native=True)
        try:
            self.tokenizer = await asyncio.to_thread(load)
        except Exception as exc:  # noqa: BLE001 - one line, then exit: the engine process sees us go
            log.error("api worker %d: cannot load the tokenizer: %s", self.cfg["index"],
                      (str(exc).splitlines() or [type(exc).__name__])[0][:300])
            self.request_exit(1)
            return
        self.apply()

    # ------------------------------------------------------------------ run
    async def run(self) -> int:
        cfg, rt = self.cfg, self.runtime
        sock = socket.socket(fileno=cfg["fd"])
        reader, writer = await ipc.open_socket(sock)
        engine = RemoteEngine(reader, writer, self.on_message, self.on_lost)
        rt.engine = engine
        app = build_app(rt)
        register_energy_routes(app, cfg["gpu_uuids"])
        app[ENERGY_SERVICE_KEY].instance_id = cfg["energy_instance_id"]   # one id for the whole server
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from model_server.metrics import multiprocess_registry

            rt.metrics.registry = multiprocess_registry(rt.metrics)
        from model_server.protocol_log import ProtocolErrorLogger

        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=5.0,
                               logger=ProtocolErrorLogger(logging.getLogger("aiohttp.server")))
        await runner.setup()
        await engine.start()
        # the tokenizer first (while the engine process loads the model): a worker that accepts
        # connections never answers "not ready" because of itself, at the start or when it replaces one
        await self.load_tokenizer()
        if self.exit_code is not None:
            await runner.cleanup()
            writer.close()
            return self.exit_code
        site = web.TCPSite(runner, cfg["host"], cfg["port"], reuse_port=True)
        await site.start()
        ipc.send(writer, ("listening", os.getpid()))
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_exit, 0)
        await self.done.wait()
        deadline = time.monotonic() + float(cfg["drain_timeout"])
        while rt.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await runner.cleanup()
        writer.close()
        return self.exit_code or 0


def main(argv: list[str]) -> int:
    cfg = json.loads(argv[1])
    from model_server.log_setup import setup_logging

    setup_logging(cfg["log_level"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # Ctrl-C reaches the engine process, which stops us
    from edge_proxy.process_tuning import raise_nofile_limit, reserve_fd_table

    raise_nofile_limit()
    reserve_fd_table()
    rc = asyncio.run(Worker(cfg).run())
    logging.shutdown()
    os._exit(rc)      # the tokenizer thread may still be loading: do not wait for it


if __name__ == "__main__":
    sys.exit(main(sys.argv))
