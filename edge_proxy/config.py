"""Proxy configuration: defaults < YAML file < environment < command-line flags.

Sections are dataclasses; each component owns its section and may add fields. A YAML file looks
like::

    proxy:
      backend_url: http://127.0.0.1:8000
      port: 8080
    energy:
      source: auto
    economics:
      usd_per_kwh: 0.12

Environment variables: ``EDGE_PROXY_<SECTION>_<FIELD>`` (upper case), e.g.
``EDGE_PROXY_PROXY_BACKEND_URL`` or ``EDGE_PROXY_ENERGY_SOURCE``. Unknown keys are errors, never
silently ignored.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from edge_proxy.proxy.forward_routes import DEFAULT_FORWARD_ROUTES, check_patterns


class ConfigError(ValueError):
    """A configuration problem, with a message fit for a one-line CLI error."""


@dataclass
class ProxySettings:
    backend_url: str = "http://127.0.0.1:8000"
    backend_kind: str = "auto"                 # auto | openai | tgi
    host: str = "127.0.0.1"
    port: int = 8080
    reuse_port: bool = False                   # SO_REUSEPORT on the client port: several proxy processes share it
    metrics_port: int | None = 9464            # None: /metrics served on the main port only
    max_body_bytes: int = 4 * 1024 * 1024       # generation requests (parsed); pass-through bodies stream
    connect_timeout_seconds: float = 5.0
    upstream_timeout_seconds: float = 300.0    # no response headers / no bytes for this long -> 504
    first_byte_timeout_seconds: float = 60.0   # streams and pass-through: no response head this long after sending -> 504
    model_name: str | None = None              # label to use instead of what the backend reports
    access_log: str | None = "-"               # "-" = stderr, a path, or None for off
    log_content: bool = False                  # include prompt/completion text in the access log
    stream_relay: str = "raw"                  # raw (lean relay for streams over http) | aiohttp
    forward_routes: list[str] = field(default_factory=lambda: list(DEFAULT_FORWARD_ROUTES))  # others: 404 ("*": all)
    max_sse_event_bytes: int = 4 * 1024 * 1024     # a backend SSE event longer than this ends the stream with an error event
    request_header_timeout_seconds: float = 10.0   # request line + headers must arrive within this -> 408, closed
    request_body_timeout_seconds: float = 60.0     # whole request body within this of its headers -> 408
    drain_timeout_seconds: float = 30.0        # SIGTERM: longest wait for in-flight requests (shutdown.py)


@dataclass
class TracingSettings:
    service_name: str = "edge-proxy"
    otlp_endpoint: str | None = None           # also read from OTEL_EXPORTER_OTLP_ENDPOINT


@dataclass
class EnergySettings:
    source: str = "auto"                       # auto | nvml | remote | replay | estimated | none
    period_seconds: float = 0.1
    gpu_uuids: list[str] = field(default_factory=list)
    idle_watts: float | None = None            # None: learned (ticks at rest; nothing in flight if the source cannot tell)
    prefill_weight: float = 1.0
    attribution: str = "token-weighted"        # token-weighted | time-weighted
    replay_path: str | None = None
    remote_url: str | None = None
    shared_path: str | None = None             # activity table shared by the proxies on one GPU counter (one host)
    estimated_watts: float = 65.0
    estimated_scope: str = "auto"              # auto | backend | machine: whose CPU time the estimate bills
    ring_size: int = 4096
    max_defer_seconds: float = 30.0            # longest a tick waits for a request's prompt-token count
    response_header: bool = False              # add x-edge-energy-joules (provisional) to non-streaming responses
    lookup_token: str | None = None            # bearer token for GET /edge/requests/{id} (None: off)


@dataclass
class EconomicsSettings:
    mode: str = "production"                   # production | paper
    usd_per_kwh: float = 0.12
    pue: float = 1.0
    gpu_usd_per_hour: float = 0.0
    api_usd_per_million_input_tokens: float = 0.15
    api_usd_per_million_output_tokens: float = 0.60
    api_cost_per_request_usd: float = 0.00125  # paper mode
    adaptation_joules: float = 0.0             # fine-tuning / adaptation energy (paper: C_train)
    adaptation_kwh: float = 0.0                # same, in kWh (added to adaptation_joules)
    adaptation_usd: float = 0.0                # adaptation cost paid in money (production)
    setup_usd: float = 0.0
    window_seconds: float = 300.0
    scores: dict[str, float] = field(default_factory=dict)        # model -> static quality score
    reference_scores: dict[str, float] = field(default_factory=dict)
    feedback_token: str | None = None
    probes_path: str | None = None
    probe_interval_seconds: float = 60.0
    probe_timeout_seconds: float = 30.0
    quality_results_path: str | None = None    # edge-eval results.json, or a directory of runs (reloaded on change)
    reference_models: dict[str, str] = field(default_factory=dict)  # Q_ret: model -> its reference (FP16) model
    adaptation_results_path: str | None = None  # edge-eval adaptation.json: C_train (reloaded on change)
    model_gigabytes: dict[str, float] = field(default_factory=dict)  # model -> weight GB override
    paper_model_sizes: dict[str, str] = field(default_factory=dict)  # paper mode: model -> "1B:INT4"
    feedback_capacity: int = 10000             # recent requests remembered for feedback
    info_poll_seconds: float = 30.0            # backend /info poll (weight bytes)


@dataclass
class ColdStartSettings:
    hold: bool = False
    spawn: str | None = None
    idle_timeout_seconds: float | None = None
    max_pending: int = 100
    max_wait_seconds: float = 300.0
    readiness_poll_seconds: float = 0.1        # readiness poll while holding (adds up to this to a cold start)
    release_burst: int = 16                    # held requests released at once when ready
    release_interval_seconds: float = 0.05     # pause between release bursts
    stop_grace_seconds: float = 30.0           # SIGTERM -> SIGKILL grace when stopping the backend
    restart_backoff_seconds: float = 1.0       # first restart delay after a crash/failed start (doubles)
    restart_backoff_max_seconds: float = 60.0
    max_held_bytes: int = 64 * 1024 * 1024     # request bytes held in memory at once, then 503 (hold_full)
    drain_seconds: float = 20.0                # on SIGTERM: wait this long for a cold start to release held requests
    retry_after_seconds: int = 2               # Retry-After on a 503 for a held request handed back (drain, full)
    watch_startup: bool = False                # record the backend's start-up as a cold start (a sidecar started before its server); holds nothing unless hold/spawn
    backend_log: str | None = None             # with spawn: the backend's stdout+stderr to this file (default: the proxy's stderr, each line prefixed "[backend PID] ")


@dataclass
class Settings:
    proxy: ProxySettings = field(default_factory=ProxySettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    energy: EnergySettings = field(default_factory=EnergySettings)
    economics: EconomicsSettings = field(default_factory=EconomicsSettings)
    coldstart: ColdStartSettings = field(default_factory=ColdStartSettings)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/env/CLI value to the field's declared type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        return _coerce(value, args[0], where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, where) for v in value]
    if origin is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{where}: expected a mapping, not valid YAML: {yaml_error_line(exc)}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(v, vt, where) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def yaml_error_line(exc: yaml.YAMLError) -> str:
    """A YAML parse error in one line: what went wrong and where (line and column, 1-based), without the quoted
    source that PyYAML's own message spreads over several lines."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(exc, "context", None)
    return f"{context}: {problem}{where}" if context else f"{problem}{where}"


def _section_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _apply(settings: Settings, section: str, key: str, value: Any, where: str) -> None:
    sections = {f.name: f for f in dataclasses.fields(Settings)}
    if section not in sections:
        raise ConfigError(f"{where}: unknown section {section!r} (known: {', '.join(sections)})")
    obj = getattr(settings, section)
    types_ = _section_types(type(obj))
    if key not in types_:
        raise ConfigError(f"{where}: unknown key {section}.{key} (known: {', '.join(types_)})")
    setattr(obj, key, _coerce(value, types_[key], f"{where} {section}.{key}"))


def load_settings(
    config_file: str | Path | None = None,
    overrides: Mapping[tuple[str, str], Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build Settings from defaults, then the YAML file, then ``EDGE_PROXY_*`` env, then overrides.

    ``overrides`` maps (section, key) to a value; entries whose value is None are skipped (a CLI
    flag that was not given).
    """
    settings = Settings()
    if config_file is not None:
        path = Path(config_file)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {yaml_error_line(exc)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping of sections")
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"config file {path}: section {section!r} must be a mapping")
            for key, value in values.items():
                _apply(settings, str(section), str(key), value, str(path))
    env = os.environ if environ is None else environ
    for f in dataclasses.fields(Settings):
        for key in _section_types(type(getattr(settings, f.name))):
            name = f"EDGE_PROXY_{f.name}_{key}".upper()
            if name in env:
                _apply(settings, f.name, key, env[name], f"environment {name}")
    if settings.tracing.otlp_endpoint is None and env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        settings.tracing.otlp_endpoint = env["OTEL_EXPORTER_OTLP_ENDPOINT"]
    for (section, key), value in (overrides or {}).items():
        if value is not None:
            _apply(settings, section, key, value, "command line")
    problem = check_patterns(settings.proxy.forward_routes)
    if problem:
        raise ConfigError(problem)
    return settings


def settings_as_dict(settings: Settings) -> dict[str, Any]:
    """Plain dict (for --print-config / --check-config output)."""
    return dataclasses.asdict(settings)
