"""``serve --api-workers N``: the engine process's lifecycle when N worker processes serve HTTP.

This process loads the model and runs the engine (``server.load_and_start``, as in one-process mode),
serves no HTTP itself, and spawns N API worker processes (``python -m model_server.api_worker``) that
each listen on the same host:port (SO_REUSEPORT: the kernel spreads connections over them) and talk
to the engine over a private socketpair (:mod:`model_server.engine_hub`). It reserves the port first
(so ``--port 0`` picks one port for all of them), prints ``listening on`` once every worker listens,
drains on SIGTERM (workers refuse new requests, live ones finish, the engine stops, workers exit),
restarts a worker that dies (its requests were cancelled; at most ``MODEL_SERVER_API_WORKER_RESTARTS``
restarts per worker per minute, default 5) and exits with 1 when every worker has died for good.
Request metrics are aggregated over the workers with prometheus_client's multiprocess mode (one
private directory per server run).
It must not handle requests (the workers do) nor load models itself.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Callable

from model_server.engine_hub import EngineHub, WorkerConnection
from model_server.runtime import Runtime

log = logging.getLogger("model_server")

LISTEN_TIMEOUT_S = 120.0        # a worker that is not listening by then fails the start
EXIT_TIMEOUT_S = 10.0           # a worker asked to exit is killed after this
RESTART_WINDOW_S = 60.0         # MODEL_SERVER_API_WORKER_RESTARTS restarts per worker in this window
RESTART_DELAY_S = 0.5           # wait before respawning (a worker that dies at once does not spin)


class RestartBudget:
    """At most ``limit`` restarts in any ``window_s`` seconds (monotonic clock): a worker that keeps dying
    is left dead instead of being respawned in a loop."""

    def __init__(self, limit: int, window_s: float = RESTART_WINDOW_S) -> None:
        self.limit, self.window_s = limit, window_s
        self.times: list[float] = []

    def take(self, now: float) -> bool:
        """Record a restart at ``now`` and return True, or False when the window's budget is spent."""
        self.times = [t for t in self.times if now - t < self.window_s]
        if len(self.times) >= self.limit:
            return False
        self.times.append(now)
        return True


def restart_limit() -> int:
    """``MODEL_SERVER_API_WORKER_RESTARTS`` (default 5; 0: never restart); ServeError when not an integer >= 0."""
    from model_server.server import ServeError

    raw = os.environ.get("MODEL_SERVER_API_WORKER_RESTARTS", "").strip() or "5"
    try:
        limit = int(raw)
    except ValueError:
        limit = -1
    if limit < 0:
        raise ServeError(f"MODEL_SERVER_API_WORKER_RESTARTS must be an integer >= 0, not {raw!r}")
    return limit


class _EngineRuntime(Runtime):
    """The engine process's runtime: every state change is also sent to the workers."""

    hub: EngineHub | None = None

    def set_state(self, state: str) -> None:
        super().set_state(state)
        if self.hub is not None:
            self.hub.broadcast_state()


def state_payload(runtime: Runtime) -> dict[str, Any]:
    """What a worker needs to mirror this process: state, /info, limits, and the model's few facts
    the HTTP layer reads (vocabulary size, generation defaults)."""
    lm = runtime.loaded
    model = None
    if lm is not None:
        gen = getattr(lm.model, "generation_config", None)
        model = {"vocab_size": int(getattr(lm.model.config, "vocab_size", 0) or 0),
                 "do_sample": bool(getattr(gen, "do_sample", False)),
                 "temperature": float(getattr(gen, "temperature", 1.0) or 1.0)}
    return {"state": runtime.state, "error": runtime.error, "info": runtime.info(),
            "limits": dataclasses.asdict(runtime.limits), "model": model}


def _reserve_port(host: str, port: int) -> socket.socket:
    """A bound, not listening SO_REUSEPORT socket: fixes the port the workers will share. A first bind
    without SO_REUSEPORT refuses a port that any other server listens on, even one sharing it by
    SO_REUSEPORT (which would silently split the traffic with us)."""
    from model_server.server import ServeError

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)    # as aiohttp's own sites do
            probe.bind((host, port))
            port = probe.getsockname()[1]
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return s


def _spawn(index: int, args: argparse.Namespace, port: int, gpu_uuids: list[str], energy_id: str,
           metrics_dir: str) -> tuple[subprocess.Popen, socket.socket]:
    ours, theirs = socket.socketpair()
    cfg = {"index": index, "fd": theirs.fileno(), "host": args.host, "port": port, "model": args.model,
           "model_name": args.model_name, "max_batch": args.max_batch,
           "max_concurrent_requests": args.max_concurrent_requests,
           "max_new_tokens_default": args.max_new_tokens_default, "log_level": args.log_level,
           "drain_timeout": args.drain_timeout, "gpu_uuids": gpu_uuids, "energy_instance_id": energy_id,
           "api_workers": args.api_workers}
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    proc = subprocess.Popen([sys.executable, "-m", "model_server.api_worker", json.dumps(cfg)],
                            pass_fds=[theirs.fileno()], env=env)
    theirs.close()
    return proc, ours


async def _wait_exit(proc: subprocess.Popen, timeout: float) -> None:
    try:
        await asyncio.to_thread(proc.wait, timeout)
    except subprocess.TimeoutExpired:
        log.warning("api worker pid %d did not exit in %.0f s; killing it", proc.pid, timeout)
        proc.kill()
        await asyncio.to_thread(proc.wait)


async def serve_with_workers(args: argparse.Namespace) -> int:
    from model_server.runtime import runtime_from_args
    from model_server.server import ServeError, load_and_start

    runtime = runtime_from_args(_EngineRuntime, args)
    restarts = restart_limit()
    gpu_uuids: list[str] = []
    if args.device in ("auto", "cuda"):
        from model_server.gpu import visible_gpu_uuids

        gpu_uuids = await asyncio.to_thread(visible_gpu_uuids)
    reserve = _reserve_port(args.host, args.port)
    port = reserve.getsockname()[1]
    metrics_dir = tempfile.mkdtemp(prefix="model_server_metrics_")
    hub = EngineHub(lambda: runtime.engine, lambda: state_payload(runtime))
    runtime.hub = hub
    energy_id = uuid.uuid4().hex          # one /energy instance id for the whole server
    procs: list[subprocess.Popen] = []
    conns: list[WorkerConnection] = []
    for i in range(args.api_workers):
        proc, sock = _spawn(i, args, port, gpu_uuids, energy_id, metrics_dir)
        procs.append(proc)
        conns.append(await hub.attach(i, sock))

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runtime.stopping.set)
    load_task = asyncio.create_task(load_and_start(runtime, args))
    stop_task = asyncio.create_task(runtime.stopping.wait())
    rc = 0
    try:
        await _await_listening(conns, procs)
        log.info("listening on http://%s:%s (loading %s; %d API worker processes)", args.host, port, args.model,
                 len(procs))
        spawn = functools.partial(_spawn, args=args, port=port, gpu_uuids=gpu_uuids, energy_id=energy_id,
                                  metrics_dir=metrics_dir)
        watch = [asyncio.create_task(_watch(i, runtime, hub, conns, procs, spawn, RestartBudget(restarts),
                                            metrics_dir)) for i in range(len(procs))]
        done, _ = await asyncio.wait({load_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if load_task in done:
            exc = load_task.exception()
            if exc is None and not hasattr(runtime.engine, "submit_to"):
                exc = ServeError(f"--api-workers needs the fast engine; this server runs the "
                                 f"{getattr(runtime.engine, 'name', '?')} engine (use --engine fast)")
                await runtime.engine.stop(drain=False, timeout_s=5.0)
            if exc is not None:
                runtime.error = str(exc)
                runtime.set_state("failed")
                print(f"model-server serve: error: {exc}", file=sys.stderr, flush=True)
                rc = 1
            else:
                await stop_task
                rc = 1 if all(c.closed.is_set() for c in conns) else 0
        else:
            log.info("stopped while %s; exiting", runtime.state)
            hub.broadcast(("exit",))
            await asyncio.gather(*(_wait_exit(p, EXIT_TIMEOUT_S) for p in procs))
            shutil.rmtree(metrics_dir, ignore_errors=True)
            logging.shutdown()
            os._exit(0)          # the load runs in a thread that cannot be interrupted
        if rc == 0:
            await _drain(runtime, hub, args.drain_timeout)
        for t in watch:
            t.cancel()
    except ServeError as exc:
        print(f"model-server serve: error: {exc}", file=sys.stderr, flush=True)
        rc = 1
    finally:
        hub.broadcast(("exit",))
        await asyncio.gather(*(_wait_exit(p, EXIT_TIMEOUT_S) for p in procs))
        reserve.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return rc


async def _await_listening(conns: list[WorkerConnection], procs: list[subprocess.Popen]) -> None:
    from model_server.server import ServeError

    deadline = time.monotonic() + LISTEN_TIMEOUT_S
    for c, p in zip(conns, procs):
        while not c.listening.is_set():
            if c.closed.is_set() or p.poll() is not None:
                raise ServeError(f"api worker {c.index} exited before listening (status {p.poll()})")
            if time.monotonic() > deadline:
                raise ServeError(f"api worker {c.index} was not listening after {LISTEN_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.05)


async def _watch(index: int, runtime: Runtime, hub: EngineHub, conns: list[WorkerConnection],
                 procs: list[subprocess.Popen], spawn: Callable[[int], tuple[subprocess.Popen, socket.socket]],
                 budget: RestartBudget, metrics_dir: str) -> None:
    """Worker ``index``'s connection ended: its requests were cancelled (engine_hub); respawn it while the
    budget allows (``conns``/``procs`` hold the current one), else leave it dead; with none left, stop."""
    from prometheus_client import multiprocess

    while True:
        conn, proc = conns[index], procs[index]
        await conn.closed.wait()
        rc = await asyncio.to_thread(proc.wait)
        multiprocess.mark_process_dead(proc.pid, metrics_dir)
        hub.detach(conn)
        if runtime.state in ("draining",) or runtime.stopping.is_set():
            return
        if not budget.take(time.monotonic()):
            left = sum(not c.closed.is_set() for c in conns)
            log.error("api worker %d (pid %d) exited with status %s; not restarted (%d restarts in %.0f s); "
                      "%d of %d left", index, proc.pid, rc, budget.limit, budget.window_s, left, len(conns))
            if left == 0:
                runtime.stopping.set()
            return
        log.error("api worker %d (pid %d) exited with status %s; restarting it", index, proc.pid, rc)
        await asyncio.sleep(RESTART_DELAY_S)
        if runtime.state in ("draining",) or runtime.stopping.is_set():
            return
        new_proc, sock = spawn(index)
        procs[index] = new_proc
        conns[index] = await hub.attach(index, sock)


async def _drain(runtime: Runtime, hub: EngineHub, timeout_s: float) -> None:
    """Workers refuse new work (state draining); live requests finish (bounded); the engine stops."""
    runtime.set_state("draining")
    deadline = time.monotonic() + timeout_s
    log.info("stopping: draining %d in-flight request(s)", hub.live_requests())
    while not hub.drained() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if runtime.engine is not None:
        try:
            await runtime.engine.stop(drain=True, timeout_s=max(0.1, deadline - time.monotonic()))
        except Exception as exc:
            log.warning("engine stop failed: %s", exc)
