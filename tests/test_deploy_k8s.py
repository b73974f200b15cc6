"""The Kubernetes manifests (k8s/): they render, their references resolve, and our own programs accept them.

- every overlay renders with ``kubectl kustomize`` (kubectl bundles kustomize v5) into the documented shape,
  and the generated copies (rules, dashboards) are up to date;
- every container's command line is parsed by our own CLIs: ``edge-proxy serve ... --check-config``
  with the container's env and its ConfigMap files, ``model-server`` through its argument parser, so a
  flag, value or port the program does not accept fails here; ports, probes, Services and
  PodMonitors must agree with what the programs will listen on.

Schemas: test_deploy_k8s_schemas.py; metric names against running proxies: test_deploy_k8s_metrics.py;
hardening and adoption checks: test_deploy_k8s_hardening.py; one meter per request path:
test_deploy_k8s_energy.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s_support import (K8S, NEEDS_KUBECTL, ROOT, arg_value, by_kind, container_env, container_port, containers,
                               localize, materialize, model_server_check_config, one, pod_spec, proxy_check_config,
                               render_overlays, workload_containers)

pytestmark = NEEDS_KUBECTL


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return render_overlays()


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



# ------------------------------------------------------------------------------------ our CLIs
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
