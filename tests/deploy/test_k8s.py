"""deploy/k8s: core resources validate against the official Kubernetes schemas (kubernetes-validate, offline), the
ServiceMonitor and the Prometheus-adapter rule by hand, and the cross-references between all of them and
Dockerfile.gpu's serve target."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO
from tests.test_dockerfile import exec_form, parse, stage

K8S = REPO / "deploy" / "k8s"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes these manifests are meant for (HPA v2, seccompProfile field)
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def resources() -> list[dict[str, Any]]:
    docs = []
    for name in kustomization()["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def one(kind: str) -> dict[str, Any]:
    (found,) = [r for r in resources() if r["kind"] == kind]
    return found


def container() -> dict[str, Any]:
    (c,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def adapter_rule() -> dict[str, Any]:
    values = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    return rule


def test_every_manifest_is_in_the_kustomization() -> None:
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "prometheus-adapter-values.yaml"}
    assert listed == on_disk
    kinds = {r["kind"] for r in resources()}
    assert kinds == {"Namespace", "PersistentVolumeClaim", "Deployment", "Service", "ServiceMonitor",
                     "HorizontalPodAutoscaler"}
    assert kustomization()["namespace"] == one("Namespace")["metadata"]["name"]


@pytest.mark.parametrize("kind", ["Namespace", "PersistentVolumeClaim", "Deployment", "Service",
                                  "HorizontalPodAutoscaler"])
def test_core_resources_validate_against_the_kubernetes_schema(kind: str) -> None:
    # strict: unknown fields (a typo such as readinesProbe) fail too
    kubernetes_validate.validate(one(kind), K8S_VERSION, strict=True)


def test_the_schema_check_rejects_broken_manifests() -> None:
    deployment = one("Deployment")
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = typo["spec"]["template"]["spec"][
        "containers"][0].pop("readinessProbe")
    no_selector = copy.deepcopy(deployment)
    del no_selector["spec"]["selector"]
    bad_port = copy.deepcopy(one("Service"))
    bad_port["spec"]["ports"][0]["port"] = "eight thousand"
    for broken in (typo, no_selector, bad_port):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_only_the_crds_lack_a_core_schema() -> None:
    for r in resources():
        if (r["apiVersion"], r["kind"]) in CRDS:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(r, K8S_VERSION, strict=True)


def test_service_monitor_scrapes_the_services_metrics_port() -> None:
    monitor, service = one("ServiceMonitor"), one("Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["name"]
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()  # ServiceMonitors select Services by label
    port_names = {p["name"] for p in service["spec"]["ports"]}
    endpoints = monitor["spec"]["endpoints"]
    assert endpoints and all(e["port"] in port_names for e in endpoints)
    assert [e["port"] for e in endpoints] == ["metrics"] and endpoints[0]["path"] == "/metrics"
    assert re.fullmatch(r"\d+s", endpoints[0]["interval"])


def test_service_selects_the_deployment_pods_and_names_their_ports() -> None:
    deployment, service = one("Deployment"), one("Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert container_ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in container_ports and container_ports[port["targetPort"]] == port["port"]


def test_probes_use_tritons_health_endpoints_on_a_declared_port() -> None:
    c = container()
    ports = {p["name"] for p in c["ports"]} | {p["containerPort"] for p in c["ports"]}
    expected = {"startupProbe": "/v2/health/ready", "readinessProbe": "/v2/health/ready",
                "livenessProbe": "/v2/health/live"}
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path and get["port"] in ports and get["port"] in ("http", 8000), probe


def test_gpu_resources_and_non_root_security_context() -> None:
    c = container()
    limits, requests = c["resources"]["limits"], c["resources"]["requests"]
    assert int(limits["nvidia.com/gpu"]) >= 1 and requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
    assert {"cpu", "memory"} <= set(requests) and {"cpu", "memory"} <= set(limits)
    pod = one("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True
    serve_user = stage("serve").all("USER")[-1].split(":")[0]
    assert str(pod["runAsUser"]) == serve_user != "0"
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_model_repository_volume() -> None:
    spec = one("Deployment")["spec"]["template"]["spec"]
    pvc = one("PersistentVolumeClaim")
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container()["volumeMounts"]}
    assert set(mounts) <= set(volumes)
    claims = [v for v in volumes.values() if "persistentVolumeClaim" in v]
    assert [v["persistentVolumeClaim"]["claimName"] for v in claims] == [pvc["metadata"]["name"]]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]  # replicas on several nodes share it
    repository = next(a.split("=", 1)[1] for a in container()["args"] if a.startswith("--model-repository="))
    assert mounts[claims[0]["name"]] == repository
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory" and mounts["dshm"] == "/dev/shm"


def test_image_and_server_flags_match_the_dockerfile_serve_target() -> None:
    release = parse()[0]["NGC_RELEASE"]
    image, _, tag = container()["image"].rpartition(":")
    assert image.rsplit("/", 1)[-1] == "medops-serve" and tag == f"{release}-py3"
    (cmd,) = stage("serve").all("CMD")
    assert container()["args"] == exec_form(cmd)  # docker run and the cluster run the same server
    assert "command" not in container()  # NVIDIA's entrypoint stays, as in the image


def test_hpa_scales_the_deployment_on_the_adapters_queue_time_metric() -> None:
    hpa, deployment = one("HorizontalPodAutoscaler"), one("Deployment")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    rule = adapter_rule()
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert float(metric["pods"]["target"]["averageValue"]) > 0
    # the rule reads Triton's own counters, per pod, through the adapter's templating
    assert rule["seriesQuery"].startswith("nv_inference_queue_duration_us{")
    query = rule["metricsQuery"]
    for needed in ("nv_inference_queue_duration_us", "nv_inference_request_success", "<<.LabelMatchers>>",
                   "<<.GroupBy>>"):
        assert needed in query, needed
    assert rule["resources"]["overrides"]["pod"]["resource"] == "pod"
    assert re.search(rule["name"]["matches"], "nv_inference_queue_duration_us")


def test_docs_apply_the_kustomization() -> None:
    assert "kubectl apply -k deploy/k8s" in (REPO / "docs" / "scale-out.md").read_text()
    assert Path(K8S / "kustomization.yaml").is_file()
