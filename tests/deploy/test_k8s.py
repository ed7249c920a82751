"""deploy/k8s: core resources validate against the official Kubernetes schemas (kubernetes-validate, offline), the
ServiceMonitor and the Prometheus-adapter rule by hand, and the cross-references between all of them and
Dockerfile.gpu's serve target; the lock-down (read-only repository, admin key from a Secret, NetworkPolicy, the
gRPC TLS component)."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO
from tests.test_dockerfile import exec_form, parse, run_serve_command, same_words, stage

K8S = REPO / "deploy" / "k8s"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes these manifests are meant for (HPA v2, seccompProfile field)
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
TEMPLATES = {"secret.example.yaml"}  # applied by hand (kubectl create secret), never by the kustomization
TLS = K8S / "grpc-tls"


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


def template(name: str) -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return doc


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def adapter_rule() -> dict[str, Any]:
    values = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    return rule


def test_every_manifest_is_in_the_kustomization() -> None:
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "prometheus-adapter-values.yaml"}
    assert listed == on_disk - TEMPLATES
    assert not listed & TEMPLATES  # a placeholder must never be applied over the real Secret
    kinds = {r["kind"] for r in resources()}
    assert kinds == {"Namespace", "PersistentVolumeClaim", "Deployment", "Service", "ServiceMonitor",
                     "HorizontalPodAutoscaler", "NetworkPolicy"}
    assert kustomization()["namespace"] == one("Namespace")["metadata"]["name"]


@pytest.mark.parametrize("kind", ["Namespace", "PersistentVolumeClaim", "Deployment", "Service",
                                  "HorizontalPodAutoscaler", "NetworkPolicy"])
def test_core_resources_validate_against_the_kubernetes_schema(kind: str) -> None:
    # strict: unknown fields (a typo such as readinesProbe) fail too
    kubernetes_validate.validate(one(kind), K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_templates_validate_against_the_kubernetes_schema(name: str) -> None:
    kubernetes_validate.validate(template(name), K8S_VERSION, strict=True)


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


def test_model_repository_volume(tmp_path: Path) -> None:
    spec = one("Deployment")["spec"]["template"]["spec"]
    pvc = one("PersistentVolumeClaim")
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container()["volumeMounts"]}
    assert set(mounts) <= set(volumes)
    claims = [v for v in volumes.values() if "persistentVolumeClaim" in v]
    assert [v["persistentVolumeClaim"]["claimName"] for v in claims] == [pvc["metadata"]["name"]]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]  # replicas on several nodes share it
    _, server = run_serve_command(tmp_path, {"MEDOPS_TRITON_ADMIN_KEY": "k" * 32})  # what the shell line starts
    repository = next(a.split("=", 1)[1] for a in server if a.startswith("--model-repository="))
    assert mounts[claims[0]["name"]] == repository
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory" and mounts["dshm"] == "/dev/shm"


def test_image_and_server_flags_match_the_dockerfile_serve_target() -> None:
    release = parse()[0]["NGC_RELEASE"]
    image, _, tag = container()["image"].rpartition(":")
    assert image.rsplit("/", 1)[-1] == "medops-serve" and tag == f"{release}-py3"
    (cmd,) = stage("serve").all("CMD")
    # docker run and the cluster run the same server (the same shell line, folded differently)
    assert same_words(container()["args"]) == same_words(exec_form(cmd))
    assert "command" not in container()  # NVIDIA's entrypoint stays, as in the image


def test_model_repository_is_read_only_and_never_polled(tmp_path: Path) -> None:
    spec = one("Deployment")["spec"]["template"]["spec"]
    (claim,) = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert claim["persistentVolumeClaim"]["readOnly"] is True
    (mount,) = [m for m in container()["volumeMounts"] if m["name"] == claim["name"]]
    assert mount["readOnly"] is True
    assert container()["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["automountServiceAccountToken"] is False  # Triton never calls the Kubernetes API
    # what the shell line starts: models loaded once (explicit control), no polling of the shared volume
    _, server = run_serve_command(tmp_path, {"MEDOPS_TRITON_ADMIN_KEY": "k" * 32})
    assert server is not None and "--model-control-mode=explicit" in server and "--load-model=*" in server
    assert not any("poll" in arg for arg in server)


def test_admin_key_comes_from_the_secret_into_tritons_flags(tmp_path: Path) -> None:
    from serve.triton_server import ADMIN_KEY_ENV, restricted_args

    secret = template("secret.example.yaml")
    ref = env_of(container())[ADMIN_KEY_ENV]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert ref.get("optional") is not True  # no Secret, no pod: never an open server
    assert "value" not in env_of(container())[ADMIN_KEY_ENV]
    script = container()["args"][2]
    assert "$(" not in script  # no Kubernetes $(VAR) expansion: the key stays out of the pod spec
    key = "a-cluster-key-" + "0" * 32
    proc, server = run_serve_command(tmp_path, {ADMIN_KEY_ENV: key})
    assert proc.returncode == 0 and [a for a in server if "restricted" in a] == restricted_args(key)
    # the placeholder can never become a working key
    proc, server = run_serve_command(tmp_path, {ADMIN_KEY_ENV: secret["stringData"][ref["key"]]})
    assert proc.returncode == 64 and server is None


def test_network_policy_admits_only_labelled_clients_and_prometheus() -> None:
    policy, deployment = one("NetworkPolicy"), one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"} and policy["spec"]["egress"] == []
    named = {p["name"] for p in container()["ports"]}
    rules = {}
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule["ports"]}
        assert ports <= named and all(p["protocol"] == "TCP" for p in rule["ports"])
        (peer,) = rule["from"]
        assert peer["podSelector"]["matchLabels"], "every rule names its peers"
        rules[frozenset(ports)] = peer
    assert set(rules) == {frozenset({"http", "grpc"}), frozenset({"metrics"})}
    assert rules[frozenset({"http", "grpc"})]["podSelector"]["matchLabels"] == {"medops-triton-client": "true"}
    prometheus = rules[frozenset({"metrics"})]
    assert prometheus["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert prometheus["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}


def tls_deployment() -> dict[str, Any]:
    """The Deployment with the grpc-tls component's strategic-merge patch applied (env, mounts, volumes by name)."""
    kustom = yaml.safe_load((TLS / "kustomization.yaml").read_text())
    assert kustom["kind"] == "Component" and kustom["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    (entry,) = kustom["patches"]
    patch = yaml.safe_load((TLS / entry["path"]).read_text())
    deployment = copy.deepcopy(one("Deployment"))
    assert (patch["kind"], patch["metadata"]["name"]) == ("Deployment", deployment["metadata"]["name"])
    spec, patch_spec = deployment["spec"]["template"]["spec"], patch["spec"]["template"]["spec"]
    (patch_container,) = patch_spec["containers"]
    (target,) = [c for c in spec["containers"] if c["name"] == patch_container["name"]]
    for field, key in (("env", "name"), ("volumeMounts", "mountPath")):
        merged = {item[key]: item for item in target[field]}
        merged.update({item[key]: item for item in patch_container[field]})
        target[field] = list(merged.values())
    spec["volumes"] = list({**{v["name"]: v for v in spec["volumes"]},
                            **{v["name"]: v for v in patch_spec["volumes"]}}.values())
    return deployment


def test_grpc_tls_component_mounts_the_tls_secret_and_passes_it_to_triton() -> None:
    deployment = tls_deployment()
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if "secret" in volumes[m["name"]]]
    assert mount["readOnly"] is True and volumes[mount["name"]]["secret"]["secretName"] == "medops-triton-grpc-tls"
    flags = dict(a.split("=", 1) for a in env_of(c)["MEDOPS_TRITON_EXTRA_ARGS"]["value"].split())
    assert flags["--grpc-use-ssl"] == "true"
    # the files a kubernetes.io/tls Secret holds, under the mount
    assert flags["--grpc-server-cert"] == f"{mount['mountPath']}/tls.crt"
    assert flags["--grpc-server-key"] == f"{mount['mountPath']}/tls.key"
    assert env_of(container())["MEDOPS_TRITON_EXTRA_ARGS"]["value"] == ""  # off unless the component is on
    assert "#   - grpc-tls" in (K8S / "kustomization.yaml").read_text()  # how to switch it on, next to resources
    from serve.triton_server import TritonNotFound, find_tritonserver, server_env

    try:
        binary = find_tritonserver()
    except TritonNotFound as exc:
        pytest.skip(str(exc))
    usage = subprocess.run([str(binary), "--help"], env=server_env(binary), capture_output=True, text=True,
                           timeout=60)
    for flag in flags:
        assert re.search(rf"^\s+{flag}\b", usage.stdout + usage.stderr, flags=re.M), flag


def test_kustomize_builds_the_base_and_the_tls_component(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    base = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert base.returncode == 0, base.stderr
    assert {d["kind"] for d in yaml.safe_load_all(base.stdout) if d} == {r["kind"] for r in resources()}
    shutil.copytree(K8S, tmp_path / "k8s")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["../k8s"],
        "components": ["../k8s/grpc-tls"]}))
    built = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    (deployment,) = [d for d in yaml.safe_load_all(built.stdout) if d and d["kind"] == "Deployment"]
    expected = tls_deployment()
    (c,), (want,) = deployment["spec"]["template"]["spec"]["containers"], expected["spec"]["template"]["spec"][
        "containers"]
    assert env_of(c) == env_of(want)  # kustomize merges exactly as tls_deployment() assumes
    assert sorted(m["mountPath"] for m in c["volumeMounts"]) == sorted(m["mountPath"] for m in want["volumeMounts"])


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
