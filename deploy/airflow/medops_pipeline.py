"""Airflow DAG ``medops_continuous_training``: the lifecycle's steps (the same as the Kubeflow pipeline's,
:mod:`pipeline.steps`), parametrised by the same ``conf/pipeline.yaml``.

validate -> train -> evaluate -> export -> gate -> [gate passed] trial -> [trial passed, auto_promote] promote;
``finalize`` (trigger rule ``all_done``) writes the run's end into the pipeline record. Results pass from task to
task as XComs (run folder, model version, figures). A failed task is retried (``retries``) or cleared alone: the
tasks before it keep their results, nothing is redone.

Two modes (``airflow.mode`` in the config, or ``MEDOPS_AIRFLOW_MODE``):

* ``local``: each task runs its step in the Airflow worker (the project installed there);
* ``kubernetes``: each task is a ``KubernetesPodOperator`` on the ``Dockerfile.gpu`` images (``kfp.images``), the
  shared volume ``airflow.volume_claim`` at ``/mnt/medops`` (model repository, data, records; ``kfp.cluster``
  paths), a GPU for train, running ``python -m pipeline step NAME``.

Install: copy or link this file into the DAGs folder of an Airflow 3 installation that has the project
(``pip install -e ".[airflow]"``); ``MEDOPS_PIPELINE_CONFIG`` and ``MEDOPS_PIPELINE_SET`` (``key=value`` entries
separated by ``;``) choose the settings. Schedule: ``airflow.schedule`` (cron).
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, get_current_context, task

from pipeline.definition import arguments, load_config

DAG_ID = "medops_continuous_training"
MOUNT = "/mnt/medops"


def settings() -> Any:
    overrides = [o for o in os.environ.get("MEDOPS_PIPELINE_SET", "").split(";") if o.strip()]
    return load_config(os.environ.get("MEDOPS_PIPELINE_CONFIG") or None, overrides)


def run_id_of(context: dict[str, Any]) -> str:
    """The pipeline run id of this DAG run (Airflow's run id, made safe for a folder name)."""
    return "airflow-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", str(context["run_id"])).strip("-")


def local_tasks(cfg: Any) -> None:
    """The steps as Python tasks in the worker (inside a ``with DAG`` block)."""
    from pipeline.workflow import run_step

    base = arguments(cfg, engine="airflow")

    @task(retries=0)
    def begin() -> dict[str, Any]:
        args = {**base, "pipeline_run": run_id_of(get_current_context()),
                "trigger": {"kind": "airflow", "run_id": str(get_current_context()["run_id"])}}
        run_step("begin", {"args": args})
        return args

    def step(name: str, retries: int = int(cfg.kfp.retries)) -> Any:
        @task(task_id=name, retries=retries, retry_delay=timedelta(seconds=10))
        def run(args: dict[str, Any], validate: dict | None = None, train: dict | None = None,
                evaluate: dict | None = None, export: dict | None = None) -> dict[str, Any]:
            earlier = {"validate": validate, "train": train, "evaluate": evaluate, "export": export}
            return run_step(name, {"args": args, **{k: v for k, v in earlier.items() if v is not None}})

        return run

    # a "no" skips the next task only; finalize (all_done) still records the run's end
    @task.short_circuit(task_id="gate_passed", ignore_downstream_trigger_rules=False)
    def gate_passed(gate: dict[str, Any]) -> bool:
        return bool(gate["passed"])

    @task.short_circuit(task_id="trial_passed", ignore_downstream_trigger_rules=False)
    def trial_passed(trial: dict[str, Any]) -> bool:
        return trial["verdict"] == "promote"

    @task(task_id="finalize", trigger_rule="all_done")
    def finalize(args: dict[str, Any]) -> dict[str, Any]:
        return run_step("finalize", {"args": args})

    args = begin()
    validate = step("validate")(args)
    train = step("train")(args, validate=validate)
    evaluate = step("evaluate")(args, train=train)
    export = step("export")(args, train=train, evaluate=evaluate)
    gate = step("gate", retries=0)(args, export=export)
    trial = step("trial", retries=0)(args, export=export)
    promote = step("promote", retries=0)(args, export=export)
    gate >> gate_passed(gate) >> trial
    trial >> trial_passed(trial) >> promote
    [promote, gate, trial] >> finalize(args)


def pod_tasks(cfg: Any) -> None:
    """The steps as KubernetesPodOperator pods on the project's images (inside a ``with DAG`` block)."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.providers.standard.operators.python import ShortCircuitOperator
    from kubernetes.client import models as k8s

    base = arguments(cfg, engine="airflow", cluster=True)
    volume = k8s.V1Volume(name="medops", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
        claim_name=str(cfg.airflow.volume_claim)))
    mount = k8s.V1VolumeMount(name="medops", mount_path=MOUNT)
    images = cfg.kfp.images
    upstream = {"begin": (), "validate": (), "train": ("validate",), "evaluate": ("train",), "export": ("train",),
                "gate": ("export",), "trial": ("export",), "promote": ("export",), "finalize": ()}

    def pod(name: str, image: str, gpu: bool = False, **kw: Any) -> Any:
        run = "airflow-{{ run_id | replace(':', '-') | replace('+', '-') }}"
        context = ('{"args": ' + json.dumps(base).replace('"pipeline_run": ""', f'"pipeline_run": "{run}"')
                   + "".join(f', "{u}": {{{{ ti.xcom_pull(task_ids="{u}") | tojson }}}}' for u in upstream[name])
                   + "}")
        resources = k8s.V1ResourceRequirements(limits={str(cfg.kfp.gpu.type): str(cfg.kfp.gpu.count)}) if gpu \
            else None
        return KubernetesPodOperator(
            task_id=name, name=f"medops-{name}", namespace=str(cfg.airflow.namespace), image=image,
            cmds=["python", "-m", "pipeline", "step", name],
            arguments=["--context", context, "--xcom", "/airflow/xcom/return.json"],
            volumes=[volume], volume_mounts=[mount], container_resources=resources, do_xcom_push=True,
            get_logs=True, on_finish_action="delete_pod", **kw)

    steps = {"validate": pod("validate", images.default, retries=int(cfg.kfp.retries)),
             "train": pod("train", images.train, gpu=True, retries=int(cfg.kfp.retries)),
             "evaluate": pod("evaluate", images.train, retries=int(cfg.kfp.retries)),
             "export": pod("export", images.export, retries=int(cfg.kfp.retries)),
             "gate": pod("gate", images.default), "trial": pod("trial", images.default),
             "promote": pod("promote", images.default), "finalize": pod("finalize", images.default,
                                                                        trigger_rule="all_done")}
    begin = pod("begin", images.default)
    gate_ok = ShortCircuitOperator(task_id="gate_passed", ignore_downstream_trigger_rules=False,
                                   python_callable=lambda ti: bool(ti.xcom_pull(task_ids="gate")["passed"]))
    trial_ok = ShortCircuitOperator(task_id="trial_passed", ignore_downstream_trigger_rules=False,
                                    python_callable=lambda ti: ti.xcom_pull(task_ids="trial")["verdict"] == "promote")
    begin >> steps["validate"] >> steps["train"] >> steps["evaluate"] >> steps["export"] >> steps["gate"]
    steps["gate"] >> gate_ok >> steps["trial"] >> trial_ok >> steps["promote"]
    [steps["promote"], steps["gate"], steps["trial"]] >> steps["finalize"]


def build_dag(mode: str | None = None) -> DAG:
    """The DAG in ``mode`` (default: ``MEDOPS_AIRFLOW_MODE``, else ``airflow.mode`` of the config)."""
    cfg = settings()
    mode = mode or os.environ.get("MEDOPS_AIRFLOW_MODE") or str(cfg.airflow.mode)
    if mode not in ("local", "kubernetes"):
        raise ValueError(f"airflow.mode must be local or kubernetes, got {mode!r}")
    with DAG(DAG_ID, schedule=str(cfg.airflow.schedule) or None, start_date=datetime(2026, 1, 1), catchup=False,
             max_active_runs=1, tags=["medops", "continuous-training", mode],
             doc_md=(__doc__ or "").split("\n\n")[0]) as dag:
        (local_tasks if mode == "local" else pod_tasks)(cfg)
    return dag


dag = build_dag()

if __name__ == "__main__":
    dag.test()
