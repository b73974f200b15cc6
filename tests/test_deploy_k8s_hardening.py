"""The Kubernetes manifests (k8s/), adoption checks: every image has a tag or digest; hardening (read-only root,
no service-account token, bounded emptyDirs, no GPU devices without a GPU request); the compile cache outlives
the pod; the Services' single client ports and the policies fencing the model server; the gateway's replicas,
disruption budget, drain window and memory limit sized from held bytes.
"""
from __future__ import annotations

import re
from typing import Any

import pytest

from tests.k8s_support import (NEEDS_KUBECTL, arg_value, by_kind, containers, one, pod_spec, render_overlays,
                               workload_containers)

pytestmark = NEEDS_KUBECTL


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return render_overlays()


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
