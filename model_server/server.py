"""``model-server serve``: the process's lifecycle: listen first, then load, then drain on SIGTERM.

Owns startup order (listen, load the model, build and start the engine, warm up), engine selection
and draining. The HTTP routes are :mod:`model_server.app`'s and the request handling the API
modules'; this module must not answer requests itself.

Engine selection: ``--engine auto`` uses the fast engine on CUDA when ``model_server.engines.fast``
imports (its ``from_loaded(loaded, max_batch=, max_total_tokens=)`` builds it), else transformers'
continuous batching (``model_server.engines.transformers_engine``).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time

from aiohttp import web

from model_server.app import build_app
from model_server.engines.base import Engine
from model_server.runtime import Runtime, runtime_from_args
from model_server.switches import SwitchValueError, flag

log = logging.getLogger("model_server")

DEFAULT_MAX_TOTAL_TOKENS = 4096


class ServeError(Exception):
    """A one-line, user-facing startup failure."""


class SwitchError(ServeError):
    """A bad ``MODEL_SERVER_*`` switch value: an error even where ``--engine auto`` would fall back."""


def _import_torch() -> None:
    import torch  # noqa: F401  (an import statement: -X importtime reports it, importlib.import_module's would not)


def resolve_engine_name(requested: str, device_type: str) -> str:
    if requested != "auto":
        return requested
    if device_type == "cuda":
        try:
            import model_server.engines.fast  # noqa: F401

            return "fast"
        except Exception as exc:
            log.info("fast engine not importable (%s); using transformers", exc)
    return "transformers"


def create_engine(name: str, loaded, max_batch: int, max_total_tokens: int) -> Engine:
    if name == "fast":
        try:
            from model_server.engines import fast
        except Exception as exc:
            raise ServeError(f"--engine fast is not available: {exc}") from None
        factory = getattr(fast, "from_loaded", None) or getattr(fast, "create_engine", None)
        if factory is None:
            raise ServeError("model_server.engines.fast has no from_loaded()")
        try:
            return factory(loaded, max_batch=max_batch, max_total_tokens=max_total_tokens)
        except SwitchValueError as exc:      # a misconfiguration: never a reason for auto's fallback
            raise SwitchError(str(exc)) from None
        except Exception as exc:
            raise ServeError(f"the fast engine cannot serve this model: {exc}") from None
    from model_server.engines.transformers_engine import TransformersEngine

    return TransformersEngine(loaded, max_batch=max_batch, max_total_tokens=max_total_tokens)


async def load_and_start(runtime: Runtime, args: argparse.Namespace) -> None:
    """Load the model, start the engine, warm up; sets state as it goes. Raises ServeError.

    ``serve`` defaults the fast engine to background warm-up (ready once loaded; fused ops and lazy
    CUDA graphs from when its compile is done): ``MODEL_SERVER_FAST_BACKGROUND_WARMUP=0`` restores
    compiling in the warm-up phase. ``/info`` ``startup`` gets the load sub-phase ends
    (``loading.LoadedModel.load_marks``) and ``fused_ready`` (the engine's switch to its fused path)."""
    from model_server.gpu import energy_delta_joules, energy_millijoules
    from model_server.loading import LoadError, load_model, resolve_device

    runtime.set_state("loading")
    from model_server import weights_prefetch   # the disk reads the checkpoint while torch imports

    runtime.weights_prefetch = weights_prefetch.start(
        args.model, on_done=lambda _: runtime.startup.__setitem__("weights_prefetched", time.time()))
    os.environ.setdefault("MODEL_SERVER_FAST_BACKGROUND_WARMUP", "1")
    from model_server import compile_cache

    # a compile cache shipped in the image (MODEL_SERVER_COMPILE_CACHE_SEED) into the writable cache, before any compile
    runtime.compile_cache = (await asyncio.to_thread(compile_cache.seed_from_environment)).as_dict()
    from model_server import bytecode_cache     # torch's bytecode kept where the install shipped none

    runtime.bytecode_cache = bytecode_cache.configure(compile_cache.configure()).as_dict()
    await asyncio.to_thread(_import_torch)
    runtime.startup["torch_imported"] = time.time()
    try:
        device = await asyncio.to_thread(resolve_device, args.device)   # CUDA's driver init (cuInit) on a GPU host
    except LoadError as exc:
        raise ServeError(str(exc)) from None
    runtime.startup["device_ready"] = time.time()
    uuids_before: list[str] = []
    if device == "cuda":
        from model_server.gpu import visible_gpu_uuids

        uuids_before = await asyncio.to_thread(visible_gpu_uuids)
    e0 = await asyncio.to_thread(energy_millijoules, uuids_before)
    # the fast engine takes model_server.native's model and tokenizer where they apply: no transformers import
    engine_name = await asyncio.to_thread(resolve_engine_name, args.engine, device)
    native = engine_name == "fast"
    runtime.startup["load_start"] = time.time()
    t0 = time.monotonic()
    try:
        loaded = await asyncio.to_thread(load_model, args.model, device, args.quantization, native)
    except LoadError as exc:
        raise ServeError(str(exc)) from None
    runtime.startup["load_end"] = time.time()
    runtime.startup.update(loaded.load_marks)
    e1 = await asyncio.to_thread(energy_millijoules, uuids_before)
    used = {d.get("uuid") for d in loaded.devices if d.get("uuid")}
    if e0 and e1 and used and used <= set(e0):
        # only the GPUs holding the model: other visible GPUs' idle draw is not load energy
        e0 = {u: v for u, v in e0.items() if u in used}
        e1 = {u: v for u, v in e1.items() if u in used}
    runtime.load_energy_joules = energy_delta_joules(e0, e1)
    runtime.metrics.load_seconds.set(time.monotonic() - t0)
    if runtime.load_energy_joules is not None:
        runtime.metrics.load_energy.set(runtime.load_energy_joules)
    runtime.metrics.weight_bytes.set(loaded.weight_bytes)

    lim = runtime.limits
    ctx = loaded.context_length or DEFAULT_MAX_TOTAL_TOKENS
    lim.max_total_tokens = min(args.max_total_tokens or min(ctx, DEFAULT_MAX_TOTAL_TOKENS), ctx)
    lim.max_input_tokens = min(args.max_input_tokens or lim.max_total_tokens - 1, lim.max_total_tokens - 1)
    from model_server.api_common import prompt_byte_bound
    lim.max_input_bytes = await asyncio.to_thread(prompt_byte_bound, loaded.tokenizer, lim.max_input_tokens,
                                                  loaded.token_byte_facts)
    runtime.loaded = loaded

    try:
        engine = create_engine(engine_name, loaded, lim.max_batch, lim.max_total_tokens)
    except ServeError as exc:
        if args.engine != "auto" or engine_name != "fast" or loaded.load_path == "native" \
                or isinstance(exc, SwitchError):
            raise
        # auto: a model the fast engine cannot serve (another architecture) falls back to the baseline
        log.warning("%s; falling back to the transformers engine", exc)
        engine_name = "transformers"
        engine = create_engine(engine_name, loaded, lim.max_batch, lim.max_total_tokens)
    runtime.set_state("warming")
    if hasattr(engine, "on_warm"):      # called on the engine's thread when it switches to its fused path
        from model_server.engines.fast.warmup import startup_marks
        engine.on_warm = lambda: runtime.startup.update(startup_marks(engine), fused_ready=time.time())
    try:
        await engine.start()
        warm = getattr(engine, "warmup", None)
        if warm is not None and not args.no_warmup:
            ids = loaded.tokenizer("warm up", add_special_tokens=True)["input_ids"] or [0]
            await warm(list(ids))
    except Exception as exc:
        raise ServeError(f"engine {engine_name} failed to start: {type(exc).__name__}: {exc}") from None
    runtime.engine = engine
    runtime.startup["warmup_end"] = time.time()
    runtime.set_state("ready")
    log.info("ready: %s (%s, %s, engine %s, %.1f MB of weights)", runtime.served_name, loaded.quantization,
             loaded.dtype, engine.name, loaded.weight_bytes / 1e6)


async def drain(runtime: Runtime, timeout_s: float) -> None:
    """Refuse new work, let in-flight requests finish (bounded), stop the engine."""
    runtime.set_state("draining")
    deadline = time.monotonic() + timeout_s
    while runtime.in_flight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if runtime.engine is not None:
        try:
            await runtime.engine.stop(drain=True, timeout_s=max(0.1, deadline - time.monotonic()))
        except Exception as exc:
            log.warning("engine stop failed: %s", exc)


async def serve_async(args: argparse.Namespace) -> int:
    if getattr(args, "api_workers", 0):
        from model_server.api_workers import serve_with_workers   # HTTP in N worker processes

        return await serve_with_workers(args)
    from model_server.energy_route import register_energy_routes

    runtime = runtime_from_args(Runtime, args)
    app = build_app(runtime)
    gpu_uuids: list[str] = []
    if args.device in ("auto", "cuda"):
        from model_server.gpu import visible_gpu_uuids

        gpu_uuids = await asyncio.to_thread(visible_gpu_uuids)   # NVML only: no torch before listening
    register_energy_routes(app, gpu_uuids)

    from model_server.protocol_log import ProtocolErrorLogger

    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=5.0,
                           logger=ProtocolErrorLogger(logging.getLogger("aiohttp.server")))
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ServeError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    port = site._server.sockets[0].getsockname()[1] if site._server and site._server.sockets else args.port
    runtime.startup["listening"] = time.time()
    log.info("listening on http://%s:%s (loading %s)", args.host, port, args.model)

    loop = asyncio.get_running_loop()
    signals = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, runtime.stopping.set)
            signals.append(sig)
        except (NotImplementedError, RuntimeError):
            pass

    rc = 0
    load_task = asyncio.create_task(load_and_start(runtime, args))
    stop_task = asyncio.create_task(runtime.stopping.wait())
    done, _ = await asyncio.wait({load_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    if load_task in done:
        exc = load_task.exception()
        if exc is not None:
            runtime.set_state("failed")
            runtime.error = str(exc)
            print(f"model-server serve: error: {exc}", file=sys.stderr, flush=True)
            rc = 1
        else:
            await stop_task
    else:
        # stopped while loading: the load runs in a worker thread that can't be interrupted, and
        # asyncio.run would wait for it; nothing is in flight, so leave at once
        log.info("stopped while %s; exiting", runtime.state)
        await runner.cleanup()
        logging.shutdown()
        sys.stderr.flush()
        os._exit(0)
    if rc == 0:
        log.info("stopping: draining %d in-flight request(s)", runtime.in_flight)
        await drain(runtime, args.drain_timeout)
    for sig in signals:
        loop.remove_signal_handler(sig)
    await runner.cleanup()
    return rc


def run_server(args: argparse.Namespace) -> int:
    from model_server.log_setup import setup_logging

    setup_logging(args.log_level)
    from model_server.loading import LoadError, check_model_argument

    try:
        check_model_argument(args.model)
    except LoadError as exc:
        raise ServeError(str(exc)) from None
    # a file-descriptor table grown now does not double (an RCU grace period, 13-20 ms measured on
    # a 16-vCPU VM, inside an accept call of the event loop) while clients connect
    from edge_proxy.process_tuning import SWITCH_INTERVAL_SECONDS, raise_nofile_limit, reserve_fd_table
    old_nofile, new_nofile = raise_nofile_limit()      # soft limit up to the hard one (process_tuning)
    if new_nofile != old_nofile:
        log.info("raised the open-file limit from %d to %d (the hard limit)", old_nofile, new_nofile)
    reserve_fd_table()
    # the event loop and the fast engine's thread share one GIL: how long one may hold it while the
    # other waits. 0.5 ms, not Python's 5 ms: HTTP tokens/s at 64 streams 1.11x and 1.19x in two H200
    # runs (docs/benchmarks.md, "The server's thread switch interval"); the variable overrides it
    interval = os.environ.get("MODEL_SERVER_SWITCH_INTERVAL_S", "").strip() or str(SWITCH_INTERVAL_SECONDS)
    try:
        sys.setswitchinterval(float(interval))
    except ValueError:
        raise ServeError(f"MODEL_SERVER_SWITCH_INTERVAL_S must be a positive number of seconds, "
                         f"not {interval!r}") from None
    try:
        flag("MODEL_SERVER_PREFETCH_WEIGHTS")       # read by weights_prefetch at load: a bad value fails here
        early_cuda = flag("MODEL_SERVER_EARLY_CUDA_INIT")
    except SwitchValueError as exc:
        raise ServeError(str(exc)) from None
    if early_cuda and args.device != "cpu":
        from model_server.gpu import start_driver_init
        start_driver_init()
    try:
        return asyncio.run(serve_async(args))
    except KeyboardInterrupt:
        return 130
