"""deploy/k8s: each overlay renders with kustomize, validates strictly, and agrees with the server.

Built-in kinds go through kubernetes-validate --strict for Kubernetes 1.30 and
the newest version it knows; the Prometheus Operator's custom resources are not
in its schemas, so their structure is checked here. Server settings are read
back through the real charrnn-serve argument parser; the multi-node training
Job's command line through torchrun's and charrnn-train's own parsers.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from charrnn.service.config import ServeConfig, env_name, parse_args
from charrnn.v1 import generator_pb2
from tests.deployqueries import contract_series, rule_queries, selectors
from tests.deploytools import REPO, require_tool

K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu", "cpu-multinode", "gpu-multinode")
MULTINODE = ("cpu-multinode", "gpu-multinode")  # the training Job across pods (components/multinode-training)
DEVICE = {"cpu": "cpu", "gpu": "cuda", "cpu-multinode": "cpu", "gpu-multinode": "cuda"}
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CUSTOM_GROUP = "monitoring.coreos.com/v1"
GENERATOR_SERVICE = generator_pb2.DESCRIPTOR.services_by_name["Generator"].full_name
LIVENESS_SERVICE = "liveness"  # charrnn.service.server.LIVENESS_SERVICE (the server module pulls in grpc health)


@functools.cache
def _render(overlay: str) -> tuple[dict, ...]:
    kubectl = require_tool("kubectl", "renders the kustomize overlays (`kubectl kustomize`)")
    done = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def rendered(overlay: str) -> list[dict]:
    return copy.deepcopy(list(_render(overlay)))


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def server_container(docs: list[dict]) -> dict:
    return one(docs, "Deployment", "charrnn")["spec"]["template"]["spec"]["containers"][0]


def _strict_errors(doc: dict, version: str) -> str:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}"
    return ""


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_kinds_pass_strict_validation(overlay, version):
    docs = [d for d in rendered(overlay) if d["apiVersion"] != CUSTOM_GROUP]
    assert {d["kind"] for d in docs} == {"ConfigMap", "Service", "PersistentVolumeClaim", "Deployment",
                                         "PodDisruptionBudget", "HorizontalPodAutoscaler", "Job"}
    assert [e for e in (_strict_errors(d, version) for d in docs) if e] == []


def test_strict_validation_rejects_unknown_fields_and_wrong_types():
    docs = rendered("cpu")
    deployment = one(docs, "Deployment", "charrnn")
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    assert "readinessProbes" in _strict_errors(bad, "1.30.0")
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "30s"
    assert _strict_errors(bad, "1.30.0")


# Keys the Prometheus Operator's CRDs (monitoring.coreos.com/v1) accept where these files use them.
SERVICEMONITOR_SPEC = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels",
                       "sampleLimit"}
SERVICEMONITOR_ENDPOINT = {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout", "honorLabels",
                           "relabelings", "metricRelabelings", "tlsConfig"}
RULE_KEYS = {"record", "alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitor_scrapes_the_metrics_port_of_job_charrnn(overlay):
    docs = rendered(overlay)
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == CUSTOM_GROUP and set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    spec = monitor["spec"]
    assert set(spec) <= SERVICEMONITOR_SPEC and spec["endpoints"]
    wanted = spec["selector"]["matchLabels"]
    selected = [s for s in docs if s["kind"] == "Service"
                and wanted.items() <= s["metadata"].get("labels", {}).items()]
    # Exactly one Service, or each pod would be scraped twice; its name is the job label.
    assert [s["metadata"]["name"] for s in selected] == ["charrnn"]
    ports = {p["name"] for p in selected[0]["spec"]["ports"]}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= SERVICEMONITOR_ENDPOINT, endpoint
        assert endpoint["port"] in ports and endpoint["port"] == "metrics"
        assert DURATION.match(endpoint["interval"]) and DURATION.match(endpoint["scrapeTimeout"])
    jobs = {v for q in rule_queries() for s in selectors(q) for label, op, v in s.matchers if label == "job"}
    assert jobs == {"charrnn"}, "alert rules must match the ServiceMonitor's job"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheusrule_carries_exactly_the_rule_files(overlay):
    rule = one(rendered(overlay), "PrometheusRule")
    assert rule["apiVersion"] == CUSTOM_GROUP and set(rule["spec"]) == {"groups"}
    files = [g for p in ("recording-rules.yml", "alert-rules.yml")
             for g in yaml.safe_load((REPO / "deploy" / "prometheus" / p).read_text())["groups"]]
    assert rule["spec"]["groups"] == files
    for group in rule["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["rules"]
        for r in group["rules"]:
            assert set(r) <= RULE_KEYS and ("record" in r) != ("alert" in r) and r["expr"].strip(), r


def test_prometheusrule_file_is_regenerated():
    done = subprocess.run([sys.executable, str(K8S / "render_prometheusrule.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _serve_config(docs: list[dict], tmp_path) -> ServeConfig:
    """The Deployment's args and ConfigMap env read by charrnn-serve's own parser (models path made real)."""
    container = server_container(docs)
    config_map = one(docs, "ConfigMap")
    env = dict(config_map["data"])
    unknown = set(env) - {env_name(f) for f in ServeConfig.__dataclass_fields__}
    assert not unknown, f"ConfigMap keys charrnn-serve does not read: {sorted(unknown)}"
    args = [a.replace("--models=/models", f"--models={tmp_path}") for a in container["args"]]
    assert f"--models={tmp_path}" in args
    return parse_args(args, env=env)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_settings_agree_with_the_pod_spec(overlay, tmp_path):
    docs = rendered(overlay)
    config = _serve_config(docs, tmp_path)
    container = server_container(docs)
    pod = one(docs, "Deployment", "charrnn")["spec"]["template"]["spec"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": config.port, "metrics": config.metrics_port, "http": config.http_port}
    service = {p["name"]: p["targetPort"] for p in one(docs, "Service", "charrnn")["spec"]["ports"]}
    assert service == {"grpc": "grpc", "metrics": "metrics", "http": "http"}
    assert config.device == DEVICE[overlay]
    assert container["envFrom"][0]["configMapRef"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]
    # The drain (after the preStop pause) must end before the kubelet's SIGKILL.
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pause + config.drain_grace < pod["terminationGracePeriodSeconds"]
    hpa = one(docs, "HorizontalPodAutoscaler", "charrnn")
    target = next(m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods")
    assert 0 < int(target["target"]["averageValue"]) < config.max_active_streams


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_are_native_grpc_and_readiness_means_models_loaded(overlay):
    container = server_container(rendered(overlay))
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, probe
    assert container["readinessProbe"]["grpc"]["service"] == GENERATOR_SERVICE
    assert container["startupProbe"]["grpc"]["service"] == GENERATOR_SERVICE
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE  # apart from readiness


def test_comments_name_only_files_that_exist():
    named = set()
    for path in (REPO / "deploy").rglob("*.yaml"):
        named |= {(path, m) for m in re.findall(r"deploy/[\w./-]+\.(?:ya?ml|json|py)", path.read_text())}
    assert named and [f"{p}: {m}" for p, m in sorted(named) if not (REPO / m).exists()] == []


def _containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_pods_run_unprivileged_on_a_read_only_root(overlay, kind):
    pod = one(rendered(overlay), kind)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    tmp_volumes = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    for container in _containers(pod):
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, container["name"]
        assert security["allowPrivilegeEscalation"] is False, container["name"]
        assert security["capabilities"]["drop"] == ["ALL"], container["name"]
        assert any(m["mountPath"] == "/tmp" and m["name"] in tmp_volumes for m in container["volumeMounts"])


def _claim(pod: dict, container: dict, path: str) -> tuple[str, bool]:
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == path)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    return volume["persistentVolumeClaim"]["claimName"], mount.get("readOnly", False)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_training_job_exports_into_the_volume_the_servers_read(overlay):
    docs = rendered(overlay)
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    server_pod = one(docs, "Deployment", "charrnn")["spec"]["template"]["spec"]
    served, read_only = _claim(server_pod, server_pod["containers"][0], "/models")
    assert read_only and served in claims
    assert "ReadWriteMany" in claims[served]["spec"]["accessModes"]  # many server pods and the Job
    job_pod = one(docs, "Job", "charrnn-train")["spec"]["template"]["spec"]
    train, export = job_pod["initContainers"][0], job_pod["containers"][0]
    assert _program(train) == "charrnn-train" and _program(export) == "charrnn-export"
    out = next(a.split("=", 1)[1] for a in train["args"] if a.startswith("--out="))
    assert export["args"][-1] == out, "export reads the run folder training wrote"
    repo = next(a.split("=", 1)[1] for a in export["args"] if a.startswith("--repo="))
    assert _claim(job_pod, export, repo) == (served, False)
    device = next(a for a in train["args"] if a.startswith("--device="))
    assert device == f"--device={DEVICE[overlay]}"
    presets = [a for a in train["args"] if a.startswith("--preset=")]
    # The 2x1024 quality preset is for a GPU; CPU nodes train the bundled model's 2x256 preset.
    assert presets == [{"cpu": "--preset=default", "cuda": "--preset=shakespeare"}[DEVICE[overlay]]]


def _program(container: dict) -> str:
    """The charrnn command a container runs: itself, under torchrun (-m its module), or behind sh -c (as $0)."""
    command = container["command"]
    if command[0] == "torchrun":
        assert command[-2] == "-m", command
        return {"charrnn.training.cli": "charrnn-train"}[command[-1]]
    if command[:2] == ["sh", "-c"]:
        assert len(command) == 4 and f'exec {command[3]} "$@"' in command[2], command
        return command[3]
    assert len(command) == 1, command
    return command[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_only_in_the_gpu_overlay(overlay):
    docs = rendered(overlay)
    pods = [one(docs, kind)["spec"]["template"]["spec"] for kind in ("Deployment", "Job")]
    gpus = [c["resources"].get("limits", {}).get("nvidia.com/gpu") for c in
            (pods[0]["containers"][0], pods[1]["initContainers"][0])]
    assert gpus == ([1, 1] if DEVICE[overlay] == "cuda" else [None, None])
    for pod in pods:
        for container in _containers(pod):
            assert container["resources"]["requests"] and container["resources"]["limits"], container["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_pdb_and_hpa_select_the_server_pods(overlay):
    docs = rendered(overlay)
    deployment = one(docs, "Deployment", "charrnn")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    headless = one(docs, "Service", "charrnn-headless")
    assert headless["spec"]["clusterIP"] == "None"
    for service in (one(docs, "Service", "charrnn"), headless):
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert "grpc" in {p["name"] for p in service["spec"]["ports"]}
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "charrnn"}
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Pods"]["pods"]["metric"]["name"] in contract_series()
    assert kinds["Resource"]["resource"]["name"] == "cpu"  # the fallback when custom metrics are missing


def test_headless_service_explains_grpc_balancing():
    text = (K8S / "base" / "services.yaml").read_text()
    assert "dns:///" in text and "round_robin" in text and "mesh" in text


def test_prometheus_adapter_serves_the_hpa_metric():
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    hpa = yaml.safe_load((K8S / "base" / "hpa.yaml").read_text())
    metric = next(m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods")
    rules = values["rules"]["custom"]
    assert [r["name"]["as"] for r in rules] == [metric]
    assert rules[0]["seriesQuery"].startswith(metric + "{")
    assert set(rules[0]["resources"]["overrides"]) == {"namespace", "pod"}


@pytest.mark.parametrize("overlay", MULTINODE)
def test_multinode_training_runs_torchrun_in_indexed_pods_that_meet_at_pod_0(overlay):
    from torch.distributed.run import get_args_parser  # torchrun's own parser: only flags torchrun knows

    from charrnn.training.cli import build_parser

    docs = rendered(overlay)
    job = one(docs, "Job", "charrnn-train")
    pod = job["spec"]["template"]["spec"]
    train = pod["initContainers"][0]
    launch = get_args_parser().parse_args(train["command"][1:] + train["args"])
    assert launch.module and launch.training_script == "charrnn.training.cli"
    # One number of nodes: as many pods as --nnodes, all running at once (the rendezvous waits for all).
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == int(launch.nnodes)
    assert int(launch.nnodes) >= 2 and launch.rdzv_backend == "c10d" and launch.max_restarts >= 1
    # Pod 0 is reachable by name: <job>-0.<subdomain>, a headless Service publishing pods before they are Ready.
    service = one(docs, "Service", pod["subdomain"])
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    port = next(p for p in service["spec"]["ports"] if p["name"] == "rendezvous")
    assert launch.rdzv_endpoint == f"{job['metadata']['name']}-0.{pod['subdomain']}:{port['port']}"
    assert {"name": port["targetPort"], "containerPort": port["port"]} in train["ports"]
    env = {e["name"]: e for e in train["env"]}
    assert launch.local_addr == "$(POD_IP)" and env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"]["value"] == "1"  # every restart gets a store of its own
    # Every (re)started rank continues the run from the folder all pods share.
    flags = build_parser().parse_args(launch.training_script_args)
    assert flags.resume is True
    claim, _ = _claim(pod, train, "/training")
    assert one(docs, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    # Ranks per pod: one per GPU the pod asks for (one on the CPU).
    gpus = train["resources"]["limits"].get("nvidia.com/gpu", 1)
    assert int(launch.nproc_per_node) == gpus


@pytest.mark.parametrize("index, exports", [("0", True), ("1", False)])
def test_only_pod_0_of_the_multinode_job_publishes_the_model(index, exports, tmp_path):
    export = one(rendered("gpu-multinode"), "Job", "charrnn-train")["spec"]["template"]["spec"]["containers"][0]
    fake = tmp_path / "charrnn-export"
    fake.write_text('#!/bin/sh\necho "exported $*"\n')
    fake.chmod(0o755)
    done = subprocess.run(export["command"] + export["args"], capture_output=True, text=True, timeout=10,
                          env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "JOB_COMPLETION_INDEX": index})
    assert done.returncode == 0, done.stderr
    assert done.stdout == (f"exported {' '.join(export['args'])}\n" if exports else "")
