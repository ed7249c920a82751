"""The Airflow DAG (deploy/airflow/medops_pipeline.py): run for real with ``dag.test()`` at tiny size in local task
mode (a real Airflow 3 with its SQLite metadata database in a temporary AIRFLOW_HOME), and built in Kubernetes mode
(pods on the project's images, GPU on train, the shared volume) without a cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.pipeline.conftest import tiny_overrides

DAG_FILE = REPO / "deploy" / "airflow" / "medops_pipeline.py"

pytest.importorskip("airflow.sdk", reason="the airflow extra is not installed")

RUN_DAG = """
import json, sys
sys.path.insert(0, {folder!r})
import medops_pipeline
run = medops_pipeline.dag.test()
print("DAGRUN " + json.dumps({{"state": str(run.state), "tasks": {{ti.task_id: str(ti.state) for ti in
                                                                  run.get_task_instances()}}}}))
"""


def airflow_env(home: Path, overrides: list[str], mode: str = "local") -> dict[str, str]:
    return {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAG_FILE.parent), "MEDOPS_AIRFLOW_MODE": mode,
            "MEDOPS_PIPELINE_SET": ";".join(overrides), "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_dag_test_runs_the_lifecycle_and_records_it(tmp_path: Path, breastmnist_small: Path) -> None:
    env = airflow_env(tmp_path / "airflow", tiny_overrides(breastmnist_small, tmp_path))
    migrate = subprocess.run([str(Path(sys.executable).with_name("airflow")), "db", "migrate"], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-c", RUN_DAG.format(folder=str(DAG_FILE.parent))], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("DAGRUN ")), None)
    assert line, proc.stdout[-4000:] + proc.stderr[-4000:]
    run = json.loads(line.removeprefix("DAGRUN "))
    assert run["state"] == "success", run
    assert {t: run["tasks"][t] for t in ("validate", "train", "evaluate", "export", "gate", "trial", "promote",
                                         "finalize")} == dict.fromkeys(
        ("validate", "train", "evaluate", "export", "gate", "trial", "promote", "finalize"), "success")
    records = sorted((tmp_path / "records").glob("airflow-*/pipeline.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["engine"] == "airflow" and record["status"] == "completed"
    assert [record["steps"][s]["status"] for s in ("validate", "train", "evaluate", "export", "gate", "trial",
                                                   "promote")] == ["done"] * 7
    lineage = record["lineage"]
    run_json = json.loads((Path(lineage["run_dir"]) / "run.json").read_text())
    assert lineage["data_fingerprint"] == run_json["data"]["fingerprint"]  # data -> run -> model -> decision
    assert lineage["run_id"] == run_json["run_id"]
    meta = json.loads((tmp_path / "model_repository" / "breastmnist_ct" / "1" / "metadata.json").read_text())
    assert meta["lineage"]["run_id"] == run_json["run_id"]
    assert lineage["model_version"] == 1 and lineage["decision"] == "promoted: v1 is production"
    rollout = json.loads((tmp_path / "model_repository" / "breastmnist_ct" / "rollout.json").read_text())
    assert rollout["production"] == 1


def test_kubernetes_mode_runs_pods_on_the_images_with_a_gpu_for_train(tmp_path: Path) -> None:
    """The cluster mode builds (it cannot run here): one pod per step on the configured images, the shared volume,
    the GPU limit on train only, and the same gate and trial short-circuits; the schedule is the config's."""
    code = f"""
import json, sys
sys.path.insert(0, {str(DAG_FILE.parent)!r})
import medops_pipeline
dag = medops_pipeline.dag
out = {{}}
for t in dag.tasks:
    res = getattr(t, "container_resources", None)
    out[t.task_id] = {{"type": type(t).__name__, "image": getattr(t, "image", None),
                      "limits": res.limits if res is not None else None,
                      "cmds": getattr(t, "cmds", None), "claims": [v.persistent_volume_claim.claim_name for v in
                                                                     getattr(t, "volumes", []) or []],
                      "downstream": sorted(t.downstream_task_ids), "trigger_rule": str(t.trigger_rule)}}
print("TASKS " + json.dumps({{"schedule": str(dag.schedule), "tasks": out}}))
"""
    env = airflow_env(tmp_path / "airflow", [], mode="kubernetes")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("TASKS ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    built = json.loads(line.removeprefix("TASKS "))
    tasks = built["tasks"]
    assert "0 3 * * 1" in built["schedule"]
    pods = {k: v for k, v in tasks.items() if v["type"] == "KubernetesPodOperator"}
    assert set(pods) == {"begin", "validate", "train", "evaluate", "export", "gate", "trial", "promote", "finalize"}
    assert pods["train"]["image"] == "medops-train:latest" and pods["export"]["image"] == "medops-export-trt:25.02-py3"
    assert pods["train"]["limits"] == {"nvidia.com/gpu": "1"}
    assert all(p["limits"] is None for k, p in pods.items() if k != "train")
    assert all(p["claims"] == ["medops-model-repository"] for p in pods.values())
    assert pods["gate"]["cmds"] == ["python", "-m", "pipeline", "step", "gate"]
    assert tasks["gate"]["downstream"] == ["finalize", "gate_passed"]
    assert tasks["gate_passed"]["downstream"] == ["trial"]
    assert "all_done" in pods["finalize"]["trigger_rule"].lower()
