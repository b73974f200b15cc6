"""``edge-proxy serve``: run the proxy in front of one backend. Owns flags -> settings and the
process's signal handling; must not hold proxy logic (that is :func:`edge_proxy.proxy.server.build_proxy`).

Flags map to settings (``section.key``) through :data:`SERVE_FLAGS`; other components add rows for
their own sections (one line each). Precedence: defaults < ``--config`` YAML < ``EDGE_PROXY_*``
environment < flags < ``--set section.key=value``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from edge_proxy.config import ConfigError, Settings, load_settings, settings_as_dict


@dataclass(frozen=True)
class Flag:
    flag: str
    section: str
    key: str
    help: str
    type: Callable[[str], Any] | None = str
    choices: tuple[str, ...] | None = None
    store_true: bool = False


SERVE_FLAGS: list[Flag] = [
    Flag("--backend", "proxy", "backend_url", "backend base URL (default http://127.0.0.1:8000)"),
    Flag("--backend-kind", "proxy", "backend_kind", "backend API (default auto: probes /info and /v1/models)", choices=("auto", "openai", "tgi")),
    Flag("--host", "proxy", "host", "address to listen on (default 127.0.0.1)"),
    Flag("--port", "proxy", "port", "client-facing port (default 8080; 0 = any free port)", int),
    Flag("--reuse-port", "proxy", "reuse_port", "share --port with other proxy processes on this host (SO_REUSEPORT; the kernel spreads connections over them); give each its own --metrics-port, and --energy-shared to meter one GPU", None, store_true=True),
    Flag("--metrics-port", "proxy", "metrics_port", "Prometheus /metrics port (default 9464; 'none' = serve /metrics on --port)"),
    Flag("--max-body-bytes", "proxy", "max_body_bytes", "largest generation request body (parsed by the proxy), else 413; pass-through bodies stream unlimited (default 4 MiB)", int),
    Flag("--connect-timeout", "proxy", "connect_timeout_seconds", "seconds to connect to the backend, else 502 (default 5)", float),
    Flag("--upstream-timeout", "proxy", "upstream_timeout_seconds", "seconds without response headers or bytes from the backend, else 504 (default 300)", float),
    Flag("--first-byte-timeout", "proxy", "first_byte_timeout_seconds", "seconds a stream's or pass-through route's response head may take, else 504 (default 60)", float),
    Flag("--forward-routes", "proxy", "forward_routes", "comma-separated backend routes the client port forwards, '/x*' a prefix, '*' all (default: the TGI and OpenAI APIs and /health)"),
    Flag("--model-name", "proxy", "model_name", "model label for metrics (default: what the backend reports)"),
    Flag("--access-log", "proxy", "access_log", "JSON access log: '-' stderr (default), a file path, or 'none'"),
    Flag("--stream-relay", "proxy", "stream_relay", "client for streamed responses: raw (lean relay, plain http backends; default) or aiohttp", choices=("raw", "aiohttp")),
    Flag("--drain-timeout", "proxy", "drain_timeout_seconds", "on SIGTERM: seconds in-flight requests get to finish; streams still running then end with an error event (default 30)", float),
    Flag("--log-content", "proxy", "log_content", "include request bodies (prompts) in the access log (off by default)", None, store_true=True),
    Flag("--otlp-endpoint", "tracing", "otlp_endpoint", "OTLP/HTTP traces endpoint (default: $OTEL_EXPORTER_OTLP_ENDPOINT; unset = tracing off)"),
    Flag("--service-name", "tracing", "service_name", "OpenTelemetry service.name (default edge-proxy)"),
    # Other components: add rows for your section here (e.g. energy, economics, coldstart flags).
    Flag("--energy-source", "energy", "source", "energy source (default auto: nvml if NVML initialises, else estimated)", choices=("auto", "nvml", "remote", "replay", "estimated", "none")),
    Flag("--energy-period", "energy", "period_seconds", "energy sampling period in seconds (default 0.1)", float),
    Flag("--gpu-uuids", "energy", "gpu_uuids", "comma-separated GPU UUIDs to measure (default: all GPUs NVML sees)"),
    Flag("--idle-watts", "energy", "idle_watts", "idle power P_idle in W (default: learned from ticks where the GPU was at rest, or with nothing in flight when the source cannot tell)", float),
    Flag("--attribution", "energy", "attribution", "how active energy is split (default token-weighted)", choices=("token-weighted", "time-weighted")),
    Flag("--energy-replay", "energy", "replay_path", "trace file for --energy-source replay (from `edge-proxy record`)"),
    Flag("--energy-remote", "energy", "remote_url", "model server URL for --energy-source remote (default: the backend URL)"),
    Flag("--energy-shared", "energy", "shared_path", "activity table file (e.g. /dev/shm/edge-eval-gpu0) shared by every proxy process on this host that meters the same GPU: each attributes only its share of the counter (docs/metrics.md, Several proxies)"),
    Flag("--energy-header", "energy", "response_header", "add x-edge-energy-joules (provisional full joules) to non-streaming responses", None, store_true=True),
    Flag("--spawn", "coldstart", "spawn", "command that starts the backend on the first request (local scale to zero; '{port}' = the --backend port); implies --hold"),
    Flag("--hold", "coldstart", "hold", "hold requests while the backend is not ready (gateway mode) instead of answering 502", None, store_true=True),
    Flag("--watch-startup", "coldstart", "watch_startup", "record the backend's start-up as one cold start when it is not ready at proxy start (the attributing sidecar in the model server's pod: cold-start energy counted once); holds no requests unless --hold", None, store_true=True),
    Flag("--idle-timeout", "coldstart", "idle_timeout_seconds", "with --spawn: stop the backend after this many seconds without traffic (default: never)", float),
    Flag("--max-pending", "coldstart", "max_pending", "most requests held during a cold start, then 503 (default 100)", int),
    Flag("--max-wait", "coldstart", "max_wait_seconds", "longest a request is held, then 503 (default 300 s)", float),
    Flag("--max-held-bytes", "coldstart", "max_held_bytes", "most request-body bytes held in memory during a cold start, then 503 (default 64 MiB)", int),
    Flag("--drain-seconds", "coldstart", "drain_seconds", "on SIGTERM, wait this long for a cold start to release held requests before handing them back with 503 + Retry-After (default 20 s)", float),
    Flag("--economics-mode", "economics", "mode", "economics definitions: production (default) or paper (the paper's constants)", choices=("production", "paper")),
    Flag("--usd-per-kwh", "economics", "usd_per_kwh", "electricity price in USD/kWh (default 0.12)", float),
    Flag("--pue", "economics", "pue", "power usage effectiveness applied to measured energy (default 1.0)", float),
    Flag("--gpu-usd-per-hour", "economics", "gpu_usd_per_hour", "GPU rental price in USD/hour, charged by busy-time share (default 0)", float),
    Flag("--probes", "economics", "probes_path", "JSONL file of golden prompts sent through the proxy as quality probes (default: off)"),
    Flag("--feedback-token", "economics", "feedback_token", "bearer token for POST /edge/feedback (default: feedback off)"),
]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="run the proxy in front of a backend",
        description="Run the instrumentation proxy in front of one backend (our model server, TGI, vLLM "
                    "or any OpenAI-compatible server). Settings: defaults < --config YAML < EDGE_PROXY_<SECTION>_<KEY> "
                    "environment < flags < --set.")
    p.add_argument("--config", metavar="FILE", help="YAML settings file (sections proxy, tracing, energy, economics, coldstart)")
    for f in SERVE_FLAGS:
        dest = f"cfg__{f.section}__{f.key}"
        if f.store_true:
            p.add_argument(f.flag, dest=dest, action="store_const", const=True, default=None, help=f.help)
        else:
            p.add_argument(f.flag, dest=dest, default=None, choices=f.choices, help=f.help,
                           metavar=None if f.choices else f.key.upper())
    p.add_argument("--set", dest="set_", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="set any setting, e.g. --set energy.period_seconds=0.05 (repeatable)")
    p.add_argument("--check-config", action="store_true",
                   help="validate flags, config file and environment, print the settings as JSON, exit 0 without serving")
    p.set_defaults(func=run)
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config, overrides_from_args(args))
    validate(settings)
    return settings


def overrides_from_args(args: argparse.Namespace) -> dict[tuple[str, str], Any]:
    """(section, key) -> value of every flag and --set given on the command line."""
    overrides: dict[tuple[str, str], Any] = {}
    for name, value in vars(args).items():
        if name.startswith("cfg__") and value is not None:
            _, section, key = name.split("__", 2)
            overrides[(section, key)] = value
    for item in args.set_:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        lhs, value = item.split("=", 1)
        section, key = lhs.split(".", 1)
        overrides[(section.strip(), key.strip())] = value
    return overrides


def validate(settings: Settings) -> None:
    ps = settings.proxy
    u = urlsplit(ps.backend_url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ConfigError(f"backend URL must be http(s)://HOST[:PORT], got {ps.backend_url!r}")
    if ps.stream_relay not in ("raw", "aiohttp"):
        raise ConfigError(f"proxy.stream_relay must be raw or aiohttp, got {ps.stream_relay!r}")
    if ps.backend_kind not in ("auto", "openai", "tgi"):
        raise ConfigError(f"proxy.backend_kind must be auto, openai or tgi, got {ps.backend_kind!r}")
    for name, port in (("proxy.port", ps.port), ("proxy.metrics_port", ps.metrics_port)):
        if port is not None and not 0 <= port <= 65535:
            raise ConfigError(f"{name} must be 0..65535, got {port}")
    if ps.metrics_port is not None and ps.metrics_port == ps.port and ps.port != 0:
        raise ConfigError("proxy.metrics_port equals proxy.port; use 'none' to serve /metrics on the main port")
    if ps.max_body_bytes <= 0:
        raise ConfigError("proxy.max_body_bytes must be positive")
    if ps.connect_timeout_seconds <= 0 or ps.upstream_timeout_seconds <= 0:
        raise ConfigError("timeouts must be positive")
    if not ps.drain_timeout_seconds >= 0:
        raise ConfigError(f"proxy.drain_timeout_seconds must be >= 0, got {ps.drain_timeout_seconds}")
    if settings.tracing.otlp_endpoint:
        t = urlsplit(settings.tracing.otlp_endpoint)
        if t.scheme not in ("http", "https") or not t.hostname:
            raise ConfigError(f"tracing.otlp_endpoint must be an http(s) URL, got {settings.tracing.otlp_endpoint!r}")


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if args.check_config:
        # Build (not start) the runtime too, so component factories validate their sections.
        import copy

        from edge_proxy.proxy.server import build_proxy

        dry = copy.deepcopy(settings)
        dry.proxy.access_log = None          # a dry run creates no files
        build_proxy(dry)
        print(json.dumps(settings_as_dict(settings), indent=2, default=str))
        return 0
    from edge_proxy.process_tuning import raise_nofile_limit, reserve_fd_table
    old_nofile, new_nofile = raise_nofile_limit()   # 1,000 streams need more than the common 1024
    if new_nofile != old_nofile:
        print(f"edge-proxy: raised the open-file limit from {old_nofile} to {new_nofile} (the hard limit)",
              file=sys.stderr, flush=True)
    reserve_fd_table()      # before any thread starts: a table that never doubles while serving
    reload_from = (args.config, overrides_from_args(args)) if args.config else None
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return asyncio.run(_serve(settings, reload_from))
    return uvloop.run(_serve(settings, reload_from))    # faster event loop (see docs/benchmarks.md, Proxy overhead)


async def _serve(settings: Settings, reload_from: tuple[str, dict] | None = None) -> int:
    from edge_proxy.process_tuning import tune_process_for_serving
    from edge_proxy.proxy.server import build_proxy

    runtime = build_proxy(settings)
    try:
        await runtime.start()
    except OSError as exc:
        await runtime.stop()
        p = settings.proxy
        ports = f"port {p.port}" + (f" or metrics port {p.metrics_port}" if p.metrics_port is not None else "")
        raise ConfigError(f"cannot listen on {p.host} ({ports}): {exc.strerror or exc}") from None
    tune_process_for_serving()    # gc.freeze of the start-up heap, 0.5 ms GIL switch interval
    print(f"edge-proxy: listening on {runtime.url} -> {settings.proxy.backend_url} "
          f"(metrics: {runtime.metrics_url})", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloader = None
    if reload_from is not None and runtime.components.get("economics") is not None:
        # Prices reload live: SIGHUP or a change of the config file (edge_proxy.economics.reload).
        from edge_proxy.economics.reload import EconomicsReloader
        reloader = EconomicsReloader(runtime.components["economics"], reload_from[0], reload_from[1],
                                     runtime.registry)
        reloader.start(loop)
    await stop.wait()
    if reloader is not None:
        await reloader.stop()
    from edge_proxy.proxy.shutdown import graceful_stop
    await graceful_stop(runtime, settings.proxy.drain_timeout_seconds)   # /metrics answers until the end
    return 0
