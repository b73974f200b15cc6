"""The Kubernetes manifests (k8s/) against running proxies: the gateway and the sidecar started exactly as the
overlays run them (ports moved to free ones on 127.0.0.1); the metric names used by the KEDA trigger, the
recording rules, the dashboards and docs/kubernetes.md exist in their /metrics; the gateway's probes answer
while the backend is down; a sidecar pod serves a request end to end.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s_support import (ALTERNATIVE_SCALED_OBJECT, NEEDS_KUBECTL, ROOT, arg_value, by_kind, container_port,
                               localize, materialize, one, pod_spec, render_overlays, start_container_proxy)
from tests.net_support import free_port, stop_process

pytestmark = NEEDS_KUBECTL


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return render_overlays()


# ------------------------------------------------------------------------------------ metric names
PROM_NAME = re.compile(r"\b(edge_proxy_[a-z0-9_]+|model_server_[a-z0-9_]+)\b")


def exported_names(text: str) -> set[str]:
    """Series names a /metrics page can produce (histogram/summary suffixes included)."""
    names = set()
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m:
            base, kind = m.groups()
            names.add(base)
            if kind == "counter":
                names.add(base + "_total" if not base.endswith("_total") else base)
            if kind in ("histogram", "summary"):
                names.update({base + "_sum", base + "_count", base + "_bucket"})
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


GATEWAY_PROBES: dict[str, tuple[str, Any]] = {}


@pytest.fixture(scope="module")
def gateway_metrics(rendered: dict[str, list[dict]], tmp_path_factory: pytest.TempPathFactory) -> str:
    """Start the gateway exactly as the scale-to-zero overlay runs it (ports moved to free ones,
    backend and energy URL pointed at a closed local port) and read its /metrics."""
    docs = rendered["scale-to-zero"]
    gw = one(docs, "Deployment", "edge-eval-gateway")
    spec = pod_spec(gw)
    (c,) = spec["containers"]
    args = localize(c["args"], materialize(gw, spec, c, docs, tmp_path_factory.mktemp("gateway")))
    port, mport, dead = free_port(), free_port(), free_port()
    proc = start_container_proxy(args, c, {"--port": str(port), "--metrics-port": str(mport),
                                           "--backend": f"http://127.0.0.1:{dead}"},
                                 stderr=subprocess.PIPE, EDGE_PROXY_PROXY_HOST="127.0.0.1")
    try:
        deadline = time.monotonic() + 30
        text = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=2) as r:
                    text = r.read().decode()
                break
            except OSError:
                time.sleep(0.1)
        assert text is not None, f"gateway did not serve /metrics: {proc.stderr.read() if proc.poll() is not None else 'timeout'}"
        # Its probes, on the ports they name, while the backend is down (as at zero replicas).
        local = {container_port(c, "http"): port, container_port(c, "metrics"): mport}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = c[probe]["httpGet"]
            url = f"http://127.0.0.1:{local[container_port(c, get['port'])]}{get['path']}"
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    status = r.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError as exc:
                status = str(exc)
            GATEWAY_PROBES[probe] = (get["path"], status)
        # docs/kubernetes.md sends readers to the cold-start snapshot on the metrics port.
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/edge/cold-starts", timeout=5) as r:
            GATEWAY_PROBES["cold-starts snapshot"] = ("/edge/cold-starts", r.status)
            json.loads(r.read())
        # What KEDA's metrics-api scaler reads (the path from the ScaledObject's URL).
        so = one(docs, "ScaledObject", "edge-eval-model-server")
        path = urllib.parse.urlsplit(so["spec"]["triggers"][0]["metadata"]["url"]).path
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}{path}", timeout=5) as r:
            GATEWAY_PROBES["pending"] = (path, json.loads(r.read()))
        # The gateway meters nothing (energy none); the energy series come from the attributing
        # sidecar in the model-server pod: its /metrics too, started as the overlay runs it.
        return text + sidecar_metrics(docs, tmp_path_factory.mktemp("sidecar"), dead)
    finally:
        stop_process(proc, 15)


def sidecar_metrics(docs: list[dict], tmp: Path, dead: int) -> str:
    """The /metrics text of the overlay's sidecar proxy, run with the manifest's flags (ports moved,
    backend and /energy pointed at a closed local port: the model server not up yet)."""
    dep = one(docs, "Deployment", "edge-eval-model-server")
    spec = pod_spec(dep)
    (c,) = [x for x in spec.get("initContainers", []) if x["command"][0] == "edge-proxy"]
    args = localize(c["args"], materialize(dep, spec, c, docs, tmp))
    mport = free_port()
    proc = start_container_proxy(args, c, {"--port": str(free_port()), "--metrics-port": str(mport),
                                           "--backend": f"http://127.0.0.1:{dead}",
                                           "--energy-remote": f"http://127.0.0.1:{dead}"})
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=2) as r:
                    return r.read().decode()
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"sidecar did not serve /metrics (exit {proc.poll()})")
    finally:
        stop_process(proc, 15)


def test_keda_reads_what_the_gateway_serves(rendered: dict[str, list[dict]], gateway_metrics: str) -> None:
    """The metrics-api trigger's valueLocation is a number in the running gateway's /edge/pending
    (0 with nothing held); the Prometheus alternative queries metrics the gateway exports."""
    so = one(rendered["scale-to-zero"], "ScaledObject", "edge-eval-model-server")
    (trig,) = so["spec"]["triggers"]
    body = GATEWAY_PROBES["pending"][1]
    value = body
    for key in trig["metadata"]["valueLocation"].split("."):
        value = value[key]
    assert isinstance(value, int) and value == 0, body
    names = exported_names(gateway_metrics)
    alt = yaml.safe_load(ALTERNATIVE_SCALED_OBJECT.read_text())
    used = set(PROM_NAME.findall(alt["spec"]["triggers"][0]["metadata"]["query"]))
    assert used, "the KEDA query uses no edge_proxy metric"
    assert used <= names, f"KEDA query uses metrics the gateway does not export: {used - names}"


def recorded_names(docs: list[dict]) -> set[str]:
    return {r["record"] for d in by_kind(docs, "PrometheusRule") for g in d["spec"]["groups"]
            for r in g["rules"] if "record" in r}


def test_recording_rules_use_metrics_the_proxy_exports(rendered: dict[str, list[dict]], gateway_metrics: str) -> None:
    names = exported_names(gateway_metrics)
    (rule,) = by_kind(rendered["scale-to-zero"], "PrometheusRule")
    used = {n for g in rule["spec"]["groups"] for r in g["rules"] for n in PROM_NAME.findall(str(r["expr"]))
            if n.startswith("edge_proxy_")}
    assert len(used) >= 5, used
    assert used <= names, f"recording rules use metrics the proxy does not export: {sorted(used - names)}"


def test_dashboards_and_docs_name_only_real_series(rendered: dict[str, list[dict]], gateway_metrics: str) -> None:
    """edge_proxy_* and edge_eval:* names in the Grafana dashboards and in docs/kubernetes.md exist
    (exported by the proxy, or recorded by the rules)."""
    names = exported_names(gateway_metrics) | recorded_names(rendered["scale-to-zero"])
    pattern = re.compile(r"\b(edge_proxy_[a-z0-9_]+|edge_eval:[a-zA-Z0-9_:]+)")
    sources = list((ROOT / "grafana" / "dashboards").glob("*.json")) + [ROOT / "docs" / "kubernetes.md"]
    for f in sources:
        if not f.exists():
            continue
        used = {n.rstrip(":_") for n in pattern.findall(f.read_text())}
        # Prefix mentions in prose ("edge_proxy_*") are not series names.
        used = {n for n in used if n not in ("edge_proxy", "edge_eval")}
        missing = sorted(n for n in used if n not in names)
        assert not missing, f"{f.relative_to(ROOT)} names series nobody exports: {missing}"


def test_gateway_probes_answer_while_the_backend_is_down(gateway_metrics: str) -> None:
    """The gateway's startup/readiness/liveness probes hit the proxy's own health route: 200 with
    the model server at zero replicas, or no request would ever reach it to be held."""
    assert set(GATEWAY_PROBES) == {"startupProbe", "readinessProbe", "livenessProbe", "cold-starts snapshot",
                                   "pending"}
    for probe, (path, status) in GATEWAY_PROBES.items():
        if probe == "pending":
            continue
        assert status == 200, f"{probe} GET {path} -> {status}"


def test_sidecar_pod_serves_a_request_end_to_end(rendered: dict[str, list[dict]], tiny_model_dir: str,
                                                 tmp_path: Path) -> None:
    """The sidecar pod's two command lines, run here: the model server with the manifest's flags
    (tiny model, CPU, local ports), its probes' paths answer on the ready server, and the proxy with
    the rendered ConfigMap in front of it serves a real OpenAI client request and prices it with
    the price sheet."""
    import openai

    from tests.conftest import start_model_server

    docs = rendered["sidecar"]
    dep = one(docs, "Deployment", "edge-eval-model-server")
    spec = pod_spec(dep)
    (ms,) = [c for c in spec["containers"] if c["command"][0] == "model-server"]
    (px,) = [c for c in spec["initContainers"] if c["command"][0] == "edge-proxy"]
    # The manifest's model-server flags, minus what must differ here (model path, address, device).
    extra, skip = [], {"--host", "--port", "--device"}
    args = ms["args"][2:]                     # drop "serve MODEL"
    i = 0
    while i < len(args):
        if args[i] in skip:
            i += 2
            continue
        extra.append(args[i])
        i += 1
    with start_model_server(tiny_model_dir, *extra) as server:
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            with urllib.request.urlopen(server.url + ms[probe]["httpGet"]["path"], timeout=5) as r:
                assert r.status == 200, probe
        pargs = localize(px["args"], materialize(dep, spec, px, docs, tmp_path / "proxy"))
        port, mport = free_port(), free_port()
        proc = start_container_proxy(pargs, px, {"--backend": server.url, "--port": str(port),
                                                 "--metrics-port": str(mport),
                                                 "--energy-source": "estimated"})   # no GPU here: estimated for nvml
        try:
            from tests.net_support import wait_http_ok
            wait_http_ok(f"http://127.0.0.1:{mport}/healthz", timeout=30, proc=proc)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
            model = client.models.list().data[0].id
            assert model == arg_value(ms["args"], "--model-name")
            out = client.chat.completions.create(model=model, max_tokens=4,
                                                 messages=[{"role": "user", "content": "hi"}])
            assert out.usage is not None and out.usage.completion_tokens > 0
            # The request is priced once its energy is final (bounded wait in the proxy).
            deadline = time.monotonic() + 30
            values: dict[str, float] = {}
            while time.monotonic() < deadline:
                with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
                    text = r.read().decode()
                values = {}
                for name in ("edge_proxy_api_equivalent_cost_usd_total", "edge_proxy_hardware_cost_usd_total"):
                    values[name] = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                       if line.startswith(name + "{") or line.startswith(name + " "))
                if all(v > 0 for v in values.values()):
                    break
                time.sleep(0.2)
            assert all(v > 0 for v in values.values()), values
        finally:
            stop_process(proc, 15)
