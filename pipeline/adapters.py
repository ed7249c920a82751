"""Adapters between kfp artifacts and the steps of :mod:`pipeline.steps`, for the components of
:mod:`pipeline.components`.

Kept apart from the component definitions: inside a running component kfp provides only its runtime part of
``kfp.dsl`` (no ``@dsl.component``), so the code a component body imports must not define components. Artifacts
are used through their ``path``, ``uri`` and ``metadata`` (and ``log_metric`` / ``log_roc_curve`` /
``log_confusion_matrix`` for the metrics types), nothing else of kfp.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from medops import pipeline_record as pr

Dataset = HTML = Model = Metrics = Artifact = ClassificationMetrics = Any  # kfp artifact objects (duck-typed here)


def _target(records_dir: str, pipeline_run: str, job_id: str = "") -> tuple[str, str] | None:
    from pipeline.steps import record_target

    return record_target(records_dir, pipeline_run or job_id)


def _numbers(figures: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def log_metrics(artifact: Metrics, figures: dict[str, Any], prefix: str = "") -> None:
    """Numbers as KFP ``Metrics`` (the UI's metrics table) and the same as JSON in the artifact's file (an output
    artifact without a file counts as missing: kfp.local would not reuse the step from its cache)."""
    numbers = {f"{prefix}{k}": v for k, v in _numbers(figures).items()}
    for name, value in numbers.items():
        artifact.log_metric(name, value)
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps(numbers, indent=2) + "\n")


# -- adapters: kfp artifacts <-> the steps ---------------------------------------------------------------------------
def begin_impl(records_dir: str, pipeline_run: str, job_id: str, engine: str, trigger: dict, parameters: dict) -> str:
    """Open the pipeline run record; returns the pipeline run id."""
    run_id = pipeline_run or job_id
    pr.start_record(records_dir, run_id, engine=engine, trigger=trigger, parameters=parameters)
    return run_id


def validate_impl(data: str, data_config: str, data_overrides: list, dataset: Dataset, report: HTML) -> None:
    from pipeline.steps import record_target, recorded, validate

    out = Path(dataset.path)
    out.mkdir(parents=True, exist_ok=True)
    result = recorded("validate", record_target(), validate, data, str(out), data_config, list(data_overrides))
    shutil.copyfile(out / "report.html", report.path)
    dataset.metadata.update({"data": result["data"], "fingerprint": result["fingerprint"],
                             "data_version": result["data_version"], "data_config": data_config,
                             "figures": result["figures"], "seconds": result["seconds"], "produced": pr.now()})


def train_impl(dataset: Dataset, data_overrides: list, train_overrides: list, task_name: str, run: Model,
               metrics: Metrics) -> None:
    from pipeline.steps import record_target, recorded, train

    Path(run.path).mkdir(parents=True, exist_ok=True)
    meta = dataset.metadata
    result = recorded("train", record_target(), train, meta["data"], run.path, list(train_overrides),
                      meta.get("data_config", "breastmnist"), list(data_overrides), task_name)
    run.metadata.update({k: result[k] for k in ("run_id", "run_dir", "fingerprint", "figures", "seconds")})
    run.metadata.update(framework="pytorch-lightning", produced=pr.now(), dataset_fingerprint=meta.get("fingerprint"))
    log_metrics(metrics, {f"test_{k}" if k in ("auroc", "acc") else k: v for k, v in result["figures"].items()})


def evaluate_impl(run: Model, n_resamples: int, evaluation: Artifact, report: HTML, metrics: Metrics,
                  classification: ClassificationMetrics) -> None:
    from pipeline.steps import evaluate, record_target, recorded

    out = Path(evaluation.path)
    out.mkdir(parents=True, exist_ok=True)
    result = recorded("evaluate", record_target(), evaluate, run.metadata["run_dir"], str(out), int(n_resamples))
    shutil.copyfile(out / "report.html", report.path)
    log_metrics(metrics, result["figures"], prefix=f"{result['split']}_")
    if result.get("roc"):
        roc = result["roc"]
        classification.log_roc_curve(roc["fpr"], roc["tpr"], roc["threshold"])
    if result.get("confusion_matrix"):
        classification.log_confusion_matrix(list(result["class_names"]), result["confusion_matrix"])
    Path(classification.path).write_text(json.dumps({"roc": result.get("roc"), "class_names": result["class_names"],
                                                     "confusion_matrix": result.get("confusion_matrix")}) + "\n")
    evaluation.metadata.update({k: result[k] for k in ("figures", "split", "n", "seconds")})
    evaluation.metadata.update(operating_point=json.loads(json.dumps(result["operating_point"], default=str)),
                               produced=pr.now())


def backfill(target: tuple[str, str], artifacts: dict[str, Any]) -> None:
    """Entries of the cached steps (validate, train, evaluate) that did not record themselves in this run: their
    outputs came from the cache, as the artifacts' metadata say."""
    record = pr.read_pipeline_record(pr.record_path(*target))
    for step, artifact in artifacts.items():
        if step in record.steps:
            continue
        meta = dict(artifact.metadata)
        pr.record_step(*target, step, status="cached", seconds=0.0, figures=meta.get("figures", {}),
                       outputs={"artifact": artifact.uri}, reason=f"outputs reused from the cache (made "
                                                                   f"{meta.get('produced')})")


def export_impl(dataset: Dataset, run: Model, evaluation: Artifact, model_name: str, model_repository: str,
                export_overrides: list, records_dir: str, pipeline_run: str, job_id: str, model: Model) -> None:
    from pipeline.steps import export, recorded

    target = _target(records_dir, pipeline_run, job_id)
    if target:
        backfill(target, {"validate": dataset, "train": run, "evaluate": evaluation})
        pr.record_lineage(*target, data=dataset.metadata.get("data"), data_fingerprint=dataset.metadata.get(
            "fingerprint"), data_version=dataset.metadata.get("data_version"), run_id=run.metadata.get("run_id"),
                          run_dir=run.metadata.get("run_dir"))
    Path(model.path).mkdir(parents=True, exist_ok=True)
    result = recorded("export", target, export, run.metadata["run_dir"], evaluation.path, model_name,
                      model_repository, model.path, list(export_overrides))
    model.metadata.update({k: result[k] for k in ("name", "version", "model_repository", "target", "figures")})
    model.metadata.update(lineage=json.loads(json.dumps(result["lineage"], default=str)),
                          data_version=dataset.metadata.get("data_version"), framework="onnx")
    if target:
        pr.record_lineage(*target, model=result["name"], model_version=result["version"],
                          model_repository=result["model_repository"])


def gate_impl(model: Model, eval_data: str, eval_split: str, tolerance: float, records_dir: str, pipeline_run: str,
              job_id: str, gate_metrics: Metrics) -> str:
    from pipeline.steps import gate, recorded

    target = _target(records_dir, pipeline_run, job_id)
    meta = model.metadata
    result = recorded("gate", target, gate, meta["model_repository"], meta["name"], int(meta["version"]), eval_data,
                      eval_split, float(tolerance))
    log_metrics(gate_metrics, {**result["figures"], "passed": float(result["passed"])})
    if target and not result["passed"]:
        for step in ("trial", "promote"):
            pr.record_step(*target, step, status="skipped", reason="the gate said no")
        pr.record_lineage(*target, decision="refused by the gate: nothing promoted")
    return "pass" if result["passed"] else "refuse"


def trial_impl(model: Model, mode: str, share: float, eval_data: str, eval_split: str, limits: dict,
               auto_promote: bool, triton_url: str, records_dir: str, pipeline_run: str, job_id: str,
               trial_metrics: Metrics) -> str:
    from pipeline.steps import recorded, trial

    target = _target(records_dir, pipeline_run, job_id)
    meta = model.metadata
    result = recorded("trial", target, trial, meta["model_repository"], meta["name"], int(meta["version"]), mode,
                      float(share), eval_data, eval_split, dict(limits), bool(auto_promote), triton_url)
    log_metrics(trial_metrics, result["figures"])
    if target and result["verdict"] != "promote":
        decision = {"wait": f"{mode} running, waiting for a person", "refuse": f"{mode} refused: nothing promoted"}
        pr.record_step(*target, "promote", status="skipped", reason=result["reason"])
        pr.record_lineage(*target, decision=decision[result["verdict"]])
    return result["verdict"]


def promote_impl(model: Model, eval_data: str, eval_split: str, tolerance: float, triton_url: str, records_dir: str,
                 pipeline_run: str, job_id: str) -> str:
    from pipeline.steps import promote, recorded

    target = _target(records_dir, pipeline_run, job_id)
    meta = model.metadata
    result = recorded("promote", target, promote, meta["model_repository"], meta["name"], int(meta["version"]),
                      eval_data, eval_split, float(tolerance), triton_url)
    if target:
        pr.record_lineage(*target, decision=(f"promoted: v{int(meta['version'])} is production" if result["promoted"]
                                             else "refused at promotion: nothing promoted"))
    return "promoted" if result["promoted"] else "refused"


def finalize_impl(records_dir: str, pipeline_run: str, job_id: str, state: str, error: str) -> str:
    """The run's end in its record: ``failed`` (which step, why), ``stopped`` (a gate or trial said no) or
    ``completed``."""
    target = _target(records_dir, pipeline_run, job_id)
    if not target:
        return state
    path = pr.record_path(*target)
    steps = pr.read_pipeline_record(path).steps if path.is_file() else {}
    failed = [(s, e) for s, e in steps.items() if e.get("status") == "failed"]
    stopped = [(s, e) for s, e in steps.items() if e.get("status") == "stopped"]
    if state != "SUCCEEDED" or failed:
        step, entry = failed[0] if failed else ("?", {"reason": error or state})
        pr.finish_record(*target, "failed", f"step {step} failed: {entry.get('reason')}")
        return "failed"
    if stopped:
        pr.finish_record(*target, "stopped", f"{stopped[0][0]}: {stopped[0][1].get('reason')}")
        return "stopped"
    pr.finish_record(*target, "completed")
    return "completed"
