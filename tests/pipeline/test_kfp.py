"""The Kubeflow side: the compiled IR YAML a cluster runs, and submission with the real ``kfp.Client`` whose HTTP
calls go to a small local stand-in of the KFP API server (tests/pipeline/fake_kfp.py): no cluster runs here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.pipeline.fake_kfp import FakeKFP

pytest.importorskip("kfp", reason="the pipeline extra is not installed")

CACHED = {"validate-op", "train-op", "evaluate-op"}
ALWAYS_RUN = {"begin-op", "export-op", "gate-op", "trial-op", "promote-op", "finalize-op"}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def tasks_of(spec: dict) -> dict[str, dict]:
    """Every component task of the IR, nested DAGs (exit handler, conditions) included, with its condition."""
    out: dict[str, dict] = {}

    def walk(dag: dict, condition: str) -> None:
        for name, task in dag["tasks"].items():
            comp = spec["components"][task["componentRef"]["name"]]
            cond = (task.get("triggerPolicy") or {}).get("condition") or condition
            if "dag" in comp:
                walk(comp["dag"], cond)
            else:
                out[name] = {**task, "condition": cond, "component": comp}

    walk(spec["root"]["dag"], "")
    return out


@pytest.fixture(scope="module")
def ir(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ir") / "pipeline.yaml"
    proc = cli("compile", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return yaml.safe_load(out.read_text())


def test_compiled_ir_has_images_gpu_caching_and_retries(ir: dict) -> None:
    assert ir["pipelineInfo"]["name"] == "medops-continuous-training" and ir["schemaVersion"].startswith("2.")
    tasks = tasks_of(ir)
    assert set(tasks) == CACHED | ALWAYS_RUN
    executors = ir["deploymentSpec"]["executors"]
    container = {name: executors[t["component"]["executorLabel"]]["container"] for name, t in tasks.items()}
    assert container["train-op"]["image"] == "medops-train:latest"
    assert container["export-op"]["image"] == "medops-export-trt:25.02-py3"  # TensorRT for GPU exports
    gpu = container["train-op"]["resources"]["accelerator"]
    assert gpu["resourceType"] == "nvidia.com/gpu" and gpu["resourceCount"] == "1"
    assert [n for n, c in container.items() if "accelerator" in (c.get("resources") or {})] == ["train-op"]
    assert {n for n, t in tasks.items() if (t.get("cachingOptions") or {}).get("enableCache")} == CACHED
    for name in ("validate-op", "train-op", "evaluate-op", "export-op"):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] == 2, name
    assert "retryPolicy" not in tasks["promote-op"]  # a rollout is never repeated blindly
    # no runtime pip installs: the image has the project
    assert not any("pip install" in " ".join(c["command"]) for c in container.values())
    assert "'pass'" in tasks["trial-op"]["condition"] and "'promote'" in tasks["promote-op"]["condition"]
    assert tasks["finalize-op"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"  # exit handler


def test_ui_artifacts_are_typed_for_the_kfp_ui(ir: dict) -> None:
    """Metrics, ClassificationMetrics (ROC, confusion), HTML report, Dataset and Model artifacts."""
    def outputs(component: str) -> dict[str, str]:
        arts = ir["components"][f"comp-{component}"]["outputDefinitions"]["artifacts"]
        return {k: v["artifactType"]["schemaTitle"] for k, v in arts.items()}

    assert outputs("validate-op") == {"dataset": "system.Dataset", "report": "system.HTML"}
    assert outputs("train-op") == {"run": "system.Model", "metrics": "system.Metrics"}
    assert outputs("evaluate-op") == {"evaluation": "system.Artifact", "report": "system.HTML",
                                      "metrics": "system.Metrics", "classification": "system.ClassificationMetrics"}
    assert outputs("export-op") == {"model": "system.Model"}
    export_inputs = ir["components"]["comp-export-op"]["inputDefinitions"]["artifacts"]
    assert set(export_inputs) == {"dataset", "run", "evaluation"}  # artifacts, not copied paths


def test_parameters_default_to_the_cluster_paths(ir: dict) -> None:
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert params["model_repository"]["defaultValue"] == "/mnt/medops/model_repository"
    assert params["data"]["defaultValue"] == "/mnt/medops/data/breastmnist.npz"
    assert params["model_name"]["defaultValue"] == "breastmnist_ct"
    assert params["train_overrides"]["defaultValue"] == ["experiment=breastmnist"]


def test_submit_and_schedule_go_through_kfp_client(tmp_path: Path) -> None:
    with FakeKFP() as api:
        submitted = cli("submit", "--host", api.url, "--set", "trial.mode=shadow")
        scheduled = cli("schedule", "--host", api.url)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "submitted run run-1" in submitted.stdout
    assert scheduled.returncode == 0 and "recurring run rr-1" in scheduled.stdout, scheduled.stdout + scheduled.stderr
    run = next(r for r in api.requests if r["path"].startswith("/apis/v2beta1/runs") and r["method"] == "POST")
    spec = run["body"]["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "medops-continuous-training" and "comp-train-op" in spec["components"]
    params = run["body"]["runtime_config"]["parameters"]
    assert params["trial_mode"] == "shadow" and params["model_repository"] == "/mnt/medops/model_repository"
    assert params["engine"] == "kfp" and params["trigger"] == {"kind": "manual"}
    recurring = next(r for r in api.requests if r["path"].startswith("/apis/v2beta1/recurringruns"))
    assert recurring["body"]["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"
    assert recurring["body"]["max_concurrency"] == "1" or recurring["body"]["max_concurrency"] == 1
    assert recurring["body"]["runtime_config"]["parameters"]["trigger"]["kind"] == "schedule"
    experiment = next(r for r in api.requests if r["path"] == "/apis/v2beta1/experiments" and r["method"] == "POST")
    assert experiment["body"]["display_name"] == "medops"


def test_bad_setting_is_a_clear_error() -> None:
    proc = cli("compile", "--out", "/tmp/never.yaml", "--set", "no_equals_sign")
    assert proc.returncode == 2 and "key=value" in proc.stdout


def test_graph_is_drawn_from_the_compiled_ir(tmp_path: Path) -> None:
    from pipeline.definition import load_config
    from pipeline.graph import dag_of

    proc = cli("graph", "--out", str(tmp_path / "dag.png"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "dag.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from pipeline.__main__ import compile_package

    edges, tasks = dag_of(compile_package(load_config(), tmp_path / "p.yaml"))
    chain = {(up, down) for up, down, _ in edges}
    assert {("validate-op", "train-op"), ("train-op", "evaluate-op"), ("export-op", "gate-op")} <= chain
    assert any(down == "trial-op" and "'pass'" in cond for _, down, cond in edges)
    assert tasks["train-op"]["gpu"]["resourceType"] == "nvidia.com/gpu"
