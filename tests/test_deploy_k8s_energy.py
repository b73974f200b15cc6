"""One meter per request path in the rendered manifests (issues 18 and 20): every path a client
request can take through an overlay (Service -> pod -> container -> its ``--backend`` -> ...) down
to the model server passes exactly one edge-proxy whose energy source is not ``none``, and that
one sits in the model server's pod (the attributing sidecar). A gateway (a proxy whose backend is
another pod) never meters. Energy sources are resolved by the proxy itself (``--check-config``:
flags, environment and the mounted ConfigMap), so a dropped flag that falls back to ``auto`` fails.
"""
from __future__ import annotations

import copy
import json
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.k8s_support import (K8S, NEEDS_KUBECTL, OVERLAYS, arg_value, by_kind, container_env, containers, kustomize,
                               localize, materialize, pod_spec, proxy_check_config)

pytestmark = NEEDS_KUBECTL

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class Hop:
    pod: str                     # the workload's name
    container: str
    program: str                 # edge-proxy | model-server
    energy_source: str | None    # proxies only: resolved by the proxy's --check-config
    backend: str | None = None   # proxies only


@dataclass
class Topology:
    paths: list[list[Hop]] = field(default_factory=list)
    gateways: list[Hop] = field(default_factory=list)     # proxies whose backend is another pod


_RESOLVED: dict[str, str] = {}        # one --check-config per distinct container (a few seconds each)


def resolved_energy_source(doc: dict, spec: dict, c: dict, docs: list[dict], tmp: Path) -> str:
    """What the proxy will run with: flags > environment > the mounted config file > default."""
    key = json.dumps([c["args"], container_env(c), c.get("volumeMounts", [])], sort_keys=True)
    if key not in _RESOLVED:
        _RESOLVED[key] = _resolve(doc, spec, c, docs, tmp)
    return _RESOLVED[key]


def _resolve(doc: dict, spec: dict, c: dict, docs: list[dict], tmp: Path) -> str:
    args = localize(list(c["args"]), materialize(doc, spec, c, docs, tmp))
    rc, out, err = proxy_check_config(args, container_env(c))
    if rc != 0 and arg_value(args, "--energy-source") == "nvml" and "NVML" in err:
        return "nvml"                     # no GPU here; the flag was parsed (argparse runs first)
    assert rc == 0, f"{doc['metadata']['name']}/{c['name']}: --check-config failed: {err.strip()}"
    return str(json.loads(out)["energy"]["source"])


def container_by_port(docs: list[dict], selector: dict, port: int | str) -> list[tuple[dict, dict, dict]]:
    """(workload, pod spec, container) that serve ``port`` (number or name) in pods ``selector`` picks."""
    out = []
    for d in docs:
        spec = pod_spec(d)
        if spec is None or d["kind"] != "Deployment":
            continue
        if not selector.items() <= d["spec"]["template"]["metadata"]["labels"].items():
            continue
        for c in containers(spec):
            for p in c.get("ports", []):
                if p.get("name") == port or p["containerPort"] == port:
                    out.append((d, spec, c))
    return out


def listen_port(c: dict) -> int | None:
    """The port a container serves requests on: the proxy's --port, the model server's --port."""
    v = arg_value(c.get("args", []), "--port")
    return int(v) if v is not None else None


def topology(docs: list[dict], tmp: Path) -> Topology:
    """Every request path from each client-facing Service down to a model server."""
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    topo = Topology()
    sources: dict[tuple[str, str], str] = {}
    backends_named: set[str] = set()
    for d in docs:
        spec = pod_spec(d)
        for c in containers(spec) if spec is not None else []:
            if c["command"][0] == "edge-proxy":
                host = urllib.parse.urlsplit(arg_value(c["args"], "--backend") or "http://127.0.0.1:8000").hostname
                backends_named.add(str(host))

    def source_of(d: dict, spec: dict, c: dict) -> str:
        key = (d["metadata"]["name"], c["name"])
        if key not in sources:
            sources[key] = resolved_energy_source(d, spec, c, docs, tmp / f"{key[0]}-{key[1]}")
        return sources[key]

    def walk(d: dict, spec: dict, c: dict, path: list[Hop], depth: int = 0) -> None:
        assert depth < 8, f"request path loops: {[h.container for h in path]}"
        program = c["command"][0]
        if program == "model-server":
            topo.paths.append(path + [Hop(d["metadata"]["name"], c["name"], program, None)])
            return
        assert program == "edge-proxy", f"{c['name']}: unknown program {program}"
        backend = arg_value(c["args"], "--backend") or "http://127.0.0.1:8000"
        hop = Hop(d["metadata"]["name"], c["name"], program, source_of(d, spec, c), backend)
        u = urllib.parse.urlsplit(backend)
        if u.hostname in LOCAL_HOSTS:
            nxt = [(d, spec, x) for x in containers(spec) if listen_port(x) == u.port]
        else:
            topo.gateways.append(hop)
            svc = services.get(str(u.hostname).split(".")[0])
            assert svc is not None, f"{c['name']}: backend {backend} names no Service"
            (sp,) = [p for p in svc["spec"]["ports"] if p["port"] == u.port]
            nxt = container_by_port(docs, svc["spec"]["selector"], sp["targetPort"])
        assert nxt, f"{c['name']}: backend {backend} reaches no container"
        for n in nxt:
            walk(*n, path + [hop], depth + 1)

    for name, svc in services.items():
        if name in backends_named:
            continue                      # reached through a proxy, not by clients
        for p in svc["spec"]["ports"]:
            for d, spec, c in container_by_port(docs, svc["spec"]["selector"], p["targetPort"]):
                owned = [q for q in c.get("ports", []) if q.get("name") == p["targetPort"] or q["containerPort"] == p["targetPort"]]
                if listen_port(c) in [q["containerPort"] for q in owned]:     # a request port, not metrics
                    walk(d, spec, c, [])
    return topo


def meters(path: list[Hop]) -> list[Hop]:
    return [h for h in path if h.program == "edge-proxy" and h.energy_source != "none"]


def check_one_meter_per_path(topo: Topology) -> list[str]:
    """Problems (empty: every path has exactly one meter, next to the server, and no gateway meters)."""
    problems = []
    if not topo.paths:
        problems.append("no request path reaches a model server")
    for path in topo.paths:
        desc = " -> ".join(f"{h.pod}/{h.container}[{h.energy_source or 'gpu'}]" for h in path)
        m = meters(path)
        if len(m) != 1:
            problems.append(f"{len(m)} containers meter energy on {desc}")
        elif m[0].pod != path[-1].pod:
            problems.append(f"the meter {m[0].pod}/{m[0].container} is not in the model server's pod: {desc}")
    for g in topo.gateways:
        if g.energy_source != "none":
            problems.append(f"gateway {g.pod}/{g.container} meters energy ({g.energy_source})")
    return problems


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}


def test_every_request_path_has_exactly_one_meter_next_to_the_server(rendered, tmp_path: Path) -> None:
    for overlay, docs in rendered.items():
        topo = topology(docs, tmp_path / overlay)
        assert not check_one_meter_per_path(topo), (overlay, check_one_meter_per_path(topo))
        if overlay == "scale-to-zero":
            # clients -> gateway (none) -> sidecar (the meter) -> model server
            (path,) = topo.paths
            assert [h.program for h in path] == ["edge-proxy", "edge-proxy", "model-server"], path
            assert path[0].pod == "edge-eval-gateway" and path[0].energy_source == "none"
            assert path[1].pod == path[2].pod == "edge-eval-model-server"
            assert topo.gateways and all(g.energy_source == "none" for g in topo.gateways)
        else:
            (path,) = topo.paths
            assert [h.program for h in path] == ["edge-proxy", "model-server"], path


def _set_gateway_source(docs: list[dict], value: str | None) -> list[dict]:
    out = copy.deepcopy(docs)
    for d in out:
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "edge-eval-gateway":
            (c,) = pod_spec(d)["containers"]
            args = c["args"]
            i = args.index("--energy-source")
            if value is None:
                del args[i:i + 2]               # falls back to the default (auto: a meter)
            else:
                args[i + 1] = value
    return out


def test_the_check_fails_when_a_gateway_meters(rendered, tmp_path: Path) -> None:
    """The checker above can fail: a gateway back on the remote source (the old N x energy), or with
    the flag dropped (default auto), gives a path with two meters and a metering gateway."""
    docs = rendered["scale-to-zero"]
    for value in ("remote", None):
        topo = topology(_set_gateway_source(docs, value), tmp_path / f"broken-{value}")
        problems = check_one_meter_per_path(topo)
        assert any("2 containers meter energy" in p for p in problems), problems
        assert any(p.startswith("gateway edge-eval-gateway") for p in problems), problems
    # and a sidecar switched off leaves a path with no meter at all
    side = copy.deepcopy(rendered["sidecar"])
    for d in side:
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "edge-eval-model-server":
            (px,) = [c for c in pod_spec(d)["initContainers"] if c["command"][0] == "edge-proxy"]
            px["args"][px["args"].index("--energy-source") + 1] = "none"
    problems = check_one_meter_per_path(topology(side, tmp_path / "no-meter"))
    assert any("0 containers meter energy" in p for p in problems), problems


def test_the_meter_records_the_pods_start_up_and_gateways_hold(rendered) -> None:
    """Cold starts: the attributing sidecar records its pod's start-up once (--watch-startup, no
    --hold: the pod is not Ready before the server); the gateways hold requests for it."""
    for overlay, docs in rendered.items():
        (ms,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "edge-eval-model-server"]
        (px,) = [c for c in pod_spec(ms)["initContainers"] if c["command"][0] == "edge-proxy"]
        assert "--watch-startup" in px["args"] and "--hold" not in px["args"], overlay
        # The watch lasts as long as the model server's startup probe lets the pod start.
        (server,) = [c for c in pod_spec(ms)["containers"] if c["command"][0] == "model-server"]
        window = server["startupProbe"]["periodSeconds"] * server["startupProbe"]["failureThreshold"]
        assert float(arg_value(px["args"], "--max-wait")) >= window, overlay
    (gw,) = [d for d in by_kind(rendered["scale-to-zero"], "Deployment") if d["metadata"]["name"] == "edge-eval-gateway"]
    (gc,) = pod_spec(gw)["containers"]
    assert "--hold" in gc["args"] and "--watch-startup" not in gc["args"]
