"""The Kubernetes manifests (k8s/) against schemas.

- every core resource passes ``kubernetes_validate`` in strict mode (unknown fields are errors) for
  the oldest Kubernetes the manifests need (1.30: native sidecars, preStop sleep) and the newest
  bundled one;
- the KEDA ScaledObject, PodMonitor and PrometheusRule are checked against schemas written here
  from those CRDs' documented fields (strict: an unknown or misspelt field fails), the rules and the
  KEDA query are parsed by promtool.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s_support import (ALTERNATIVE_SCALED_OBJECT, CRD_GROUPS, K8S_VERSIONS, NEEDS_KUBECTL, PROMTOOL, all_docs,
                               by_kind, one, render_overlays)

pytestmark = NEEDS_KUBECTL


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return render_overlays()


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
