"""The lifecycle's steps as plain functions, one per stage, each calling the same code as that stage's CLI.

The Kubeflow components (:mod:`pipeline.components`) and the Airflow tasks (``deploy/airflow``) are thin wrappers
around these, so both engines run the same steps. A step takes the folders its engine hands it (a kfp output
artifact's path, or a folder under the pipeline run's own folder for Airflow) and returns a JSON-ready dict: what
goes into the artifact's metadata, the pipeline record and the summary table. Heavy imports (torch, the stages)
happen inside the steps, so ``python -m pipeline --help`` and the compiler stay fast.

* validate: ``python -m datatools.validate_data`` (reports; a violation fails the step)
* train: ``python -m train`` itself, in a subprocess, with ``hydra.run.dir`` = the run artifact
* evaluate: ``python -m evaluation.evaluate`` (:func:`evaluation.evaluate.evaluate_run`)
* export: ``python -m export`` (:func:`export.build.export_model`, the parity gate included)
* gate: ``serve promote``'s gate (:func:`serve.rollout.promotion_gate`) against the current production version
* trial: ``serve canary`` / ``serve shadow`` (:func:`serve.rollout.start_trial`) with the fixed evaluation set sent
  through the routing client, its figures checked against configured limits
* promote: ``serve promote`` (:func:`serve.rollout.promote`, which applies the gate again and records it)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from medops import pipeline_record as pr

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
RECORD_ENV = ("MEDOPS_PIPELINE_RECORDS", "MEDOPS_PIPELINE_RUN")  # where steps write the record when not told


class StepFailed(RuntimeError):
    """A step that cannot go on; the message says why (it goes into the pipeline record)."""


def record_target(records_dir: str = "", pipeline_run: str = "") -> tuple[str, str] | None:
    """Where this step records itself: the arguments, else the environment ``python -m pipeline run`` sets (steps
    whose outputs are cached take no run id: it would change their cache key); None when neither says."""
    records_dir = records_dir or os.environ.get(RECORD_ENV[0], "")
    pipeline_run = pipeline_run or os.environ.get(RECORD_ENV[1], "")
    return (records_dir, pipeline_run) if records_dir and pipeline_run else None


def recorded(step: str, target: tuple[str, str] | None, fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run ``fn`` as ``step``: its entry in the pipeline record goes ``running`` -> ``done`` (with its figures and
    time) or ``failed`` (with the reason), and the step's result comes back with ``seconds`` added."""
    started = time.perf_counter()
    if target:
        pr.record_step(*target, step, status="running", started=pr.now())
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:
        if target:
            pr.record_step(*target, step, status="failed", reason=f"{type(exc).__name__}: {exc}",
                           seconds=round(time.perf_counter() - started, 1))
        raise
    result["seconds"] = round(time.perf_counter() - started, 1)
    if target:
        pr.record_step(*target, step, status=result.get("status", "done"), seconds=result["seconds"],
                       figures=result.get("figures", {}), outputs=result.get("outputs", {}),
                       reason=result.get("reason"))
    return result


def compose(config_name: str, overrides: list[str]) -> Any:
    """The stage's Hydra config, composed as its CLI composes it (same config files, same overrides)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        # paths.root_dir would come from the Hydra run (HydraConfig), which a composed config does not have
        return hydra_compose(config_name=config_name, overrides=[f"paths.root_dir={REPO}", *overrides])


def data_overrides(data: str, data_config: str, extra: list[str]) -> list[str]:
    return [f"data={data_config}", f"data.path={Path(data).resolve()}", *extra]


# -- validate ------------------------------------------------------------------------------------------------------
def validate(data: str, out_dir: str, data_config: str = "breastmnist", extra: list[str] | None = None
             ) -> dict[str, Any]:
    """Data-quality checks of ``data`` into ``out_dir`` (report.json/.md/.html); fails on a violation. Returns the
    data fingerprint (the value training records), the tracked DVC / Git LFS version and the counts."""
    from datatools.validate_data import instantiate_data, validate_source, write_reports
    from medops.datasets import DataError, fingerprint_of

    cfg = compose("validate_data", [*data_overrides(data, data_config, extra or []), f"output_dir={out_dir}"])
    try:
        source, settings = instantiate_data(cfg.data)
        report, arrays = validate_source(source, settings)
    except DataError as exc:
        raise StepFailed(f"bad input data {data}: {exc}") from exc
    write_reports(report, Path(out_dir), data=arrays)
    if report["violations"]:
        raise StepFailed(f"data validation of {data} failed: " + "; ".join(report["violations"]))
    sizes = {s: int(len(v)) for s, v in arrays.labels.items()} if arrays is not None else {}
    figures = {"images": sum(sizes.values()), **{f"{s}_images": n for s, n in sizes.items()},
               "warnings": len(report["warnings"])}
    return {"data": str(Path(data).resolve()), "fingerprint": fingerprint_of(arrays) if arrays is not None else None,
            "data_version": pr.tracked_version(data), "figures": figures,
            "outputs": {"report": str(Path(out_dir) / "report.html")}}


# -- train ---------------------------------------------------------------------------------------------------------
def train(data: str, out_dir: str, overrides: list[str], data_config: str = "breastmnist",
          extra: list[str] | None = None, task_name: str = "pipeline") -> dict[str, Any]:
    """``python -m train`` in a subprocess (the CLI itself, Hydra and all) into a new run folder under ``out_dir``;
    returns the run id and folder, the data fingerprint it trained on and its test figures."""
    from medops.run_record import RunRecordError, read_record

    run_dir = Path(out_dir) / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    cmd = [sys.executable, "-m", "train", f"hydra.run.dir={run_dir}", f"task_name={task_name}",
           *data_overrides(data, data_config, extra or []), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        record = read_record(run_dir)
    except RunRecordError as exc:
        raise StepFailed(f"python -m train exited {proc.returncode} without a run record: {exc}") from exc
    if proc.returncode != 0 or not record.completed:
        raise StepFailed(f"python -m train exited {proc.returncode}, run status {record.status} ({run_dir})")
    test = record.test
    figures = {k: test[k] for k in ("auroc", "acc") if k in test}
    figures["epochs"] = record.raw.get("epochs")
    return {"run_id": record.run_id, "run_dir": str(run_dir), "fingerprint": record.data.get("fingerprint"),
            "figures": figures, "outputs": {"run_dir": str(run_dir)}}


# -- evaluate ------------------------------------------------------------------------------------------------------
def evaluate(run_dir: str, out_dir: str, n_resamples: int = 1000) -> dict[str, Any]:
    """The clinical evaluation of the run's best checkpoint on its test split into ``out_dir`` (``report.html``,
    ``evaluation.json``, predictions) and the run's ``operating_point.json``; returns the headline figures, the ROC
    curve and the confusion matrix for the KFP UI."""
    from evaluation.evaluate import evaluate_run
    from medops.run_record import OPERATING_POINT_FILE

    cfg = compose("evaluate", [f"run={run_dir}", f"output_dir={out_dir}", f"n_resamples={n_resamples}",
                               "wandb=off"])
    result = evaluate_run(cfg)
    op_file = Path(run_dir) / OPERATING_POINT_FILE
    if op_file.is_file():  # kept with the evaluation too: it is this step's output, export reads it in the run
        shutil.copyfile(op_file, Path(out_dir) / OPERATING_POINT_FILE)
    metrics = result["evaluation"]["metrics"]
    figures = {k: metrics[k]["value"] for k in ("auroc", "sensitivity", "specificity", "accuracy") if k in metrics}
    figures["ece"] = (result.get("calibration") or {}).get("ece_calibrated", (result.get("calibration") or {})
                                                           .get("ece"))
    return {"figures": figures, "split": result["split"], "n": result["data"]["n"],
            "class_names": result["class_names"], "operating_point": result["operating_point"],
            "confusion_matrix": result["evaluation"].get("confusion_matrix"),
            "roc": roc_points(Path(out_dir) / f"predictions_{result['split']}.csv", result),
            "outputs": {"report": str(Path(out_dir) / "report.html")}}


def roc_points(predictions: Path, result: dict[str, Any], points: int = 50) -> dict[str, list[float]] | None:
    """ROC curve of the positive class (the finding) from the evaluation's predictions CSV, thinned to ``points``
    rows for the KFP UI; None for tasks without a positive class."""
    import csv

    import numpy as np
    from sklearn.metrics import roc_curve

    op = result.get("operating_point") or {}
    if op.get("positive_class") is None or not predictions.is_file():
        return None
    with predictions.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    names = result["class_names"]
    y = np.array([int(r["label"]) == op["positive_index"] for r in rows], dtype=int)
    score = np.array([float(r[f"p_{names[op['positive_index']]}"]) for r in rows])
    fpr, tpr, thr = roc_curve(y, score)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(points, len(fpr))).round().astype(int))
    thr = np.clip(thr, 0.0, 1.0)  # roc_curve starts at +inf
    return {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist(), "threshold": thr[keep].tolist(),
            "positive_class": op["positive_class"]}


# -- export --------------------------------------------------------------------------------------------------------
def export(run_dir: str, evaluation_dir: str, name: str, model_repository: str, out_dir: str,
           overrides: list[str] | None = None) -> dict[str, Any]:
    """A new parity-checked version of ``name`` in the model repository from the run's best checkpoint (the
    evaluation's operating point in the graph); a copy of the version goes to ``out_dir`` (the model artifact)."""
    from export.build import export_model
    from medops.run_record import OPERATING_POINT_FILE

    op_file = Path(run_dir) / OPERATING_POINT_FILE
    if not op_file.is_file() and (Path(evaluation_dir) / OPERATING_POINT_FILE).is_file():
        shutil.copyfile(Path(evaluation_dir) / OPERATING_POINT_FILE, op_file)  # a copied run folder lost it
    cfg = compose("export", [f"run={run_dir}", f"name={name}", f"model_repository={Path(model_repository).resolve()}",
                             *(overrides or [])])
    try:
        meta = export_model(cfg)
    except Exception as exc:  # ExportError, ParityError, RepositoryError: nothing was written
        raise StepFailed(f"export refused, nothing was written: {exc}") from exc
    version_dir = Path(model_repository).resolve() / name / str(meta["version"])
    shutil.copytree(version_dir, Path(out_dir), dirs_exist_ok=True)
    parity = meta.get("parity") or []
    figures = {"version": meta["version"], "parity_max_abs_diff": max((p["max_abs_diff"] for p in parity),
                                                                      default=None),
               "test_auroc": ((meta.get("metrics") or {}).get("test") or {}).get("auroc")}
    return {"name": name, "version": int(meta["version"]), "model_repository": str(Path(model_repository).resolve()),
            "lineage": meta["lineage"], "target": meta["target"], "figures": figures,
            "outputs": {"version_dir": str(version_dir)}}


# -- gate, trial, promote ------------------------------------------------------------------------------------------
def gate(model_repository: str, name: str, version: int, eval_data: str, split: str = "test",
         tolerance: float = 0.01) -> dict[str, Any]:
    """The promotion gate of ``serve promote`` for the new version against the current production version on a
    fixed evaluation set; a refusal is recorded in the model's ``history.jsonl`` and nothing is promoted."""
    from serve import rollout

    state = rollout.read_state(model_repository, name)
    decision = rollout.promotion_gate(model_repository, name, version, state.production, data=eval_data,
                                      split=split, tolerance=tolerance)
    figures = {f"candidate_{k}": v for k, v in (decision.candidate or {}).items() if k in ("auroc", "acc", "n")}
    figures |= {f"production_{k}": v for k, v in (decision.production or {}).items() if k in ("auroc", "acc")}
    figures["production_version"] = state.production
    if not decision.passed:
        rollout.append_history(model_repository, name, {
            "action": "pipeline gate", "to": version, "from": state.production, "decision": "refused",
            "gate": decision.as_dict(), "evaluation_set": str(eval_data), "split": split})
    return {"passed": decision.passed, "status": "done" if decision.passed else "stopped",
            "reason": "; ".join(decision.reasons), "figures": figures, "gate": decision.as_dict()}


def trial_limits_failures(report: dict[str, Any], limits: dict[str, float]) -> list[str]:
    """Which configured limits a trial's figures break (empty: the trial passed)."""
    failures = []
    versions = {v["role"]: v for v in report["versions"].values()}
    cand, prod = versions.get("candidate") or {}, versions.get("production") or {}
    p95 = (cand.get("latency_ms") or {}).get("p95")
    if cand.get("requests", 0) < limits.get("min_candidate_requests", 1):
        failures.append(f"candidate answered {cand.get('requests', 0)} requests, fewer than "
                        f"{limits.get('min_candidate_requests', 1)}")
    if p95 is not None and p95 > limits.get("max_p95_ms", float("inf")):
        failures.append(f"candidate p95 latency {p95:.1f} ms > {limits['max_p95_ms']} ms")
    shift = max((abs((cand["class_shares"].get(c) or 0) - (prod["class_shares"].get(c) or 0))
                 for c in cand.get("class_shares") or {} if prod.get("requests")), default=0.0)
    if shift > limits.get("max_class_share_shift", 1.0):
        failures.append(f"a predicted-class share moved by {shift:.2f} > {limits['max_class_share_shift']}")
    agreement = (report.get("shadow") or {}).get("agreement")
    if agreement is not None and agreement < limits.get("min_agreement", 0.0):
        failures.append(f"shadow agreement {agreement:.3f} < {limits['min_agreement']}")
    return failures


def trial_traffic(model_repository: str, name: str, production: int, candidate: int, mode: str, share: float,
                  eval_data: str, split: str, url: str = "", batch_size: int = 4, seed: int = 0) -> dict[str, Any]:
    """Send the fixed evaluation set through the routing client of ``serve predict``/``batch`` (Triton at ``url``,
    else in-process onnxruntime) as a canary or shadow would see it; returns the trial report (per-version requests,
    latency percentiles, class shares; shadow agreement)."""
    from serve.client import TritonBackend
    from serve.drift import read_images
    from serve.inputs import iter_inputs
    from serve.local_backend import LocalBackend
    from serve.rollout import RolloutBackend

    def open_version(version: int) -> Any:
        return TritonBackend(url, name, version=version) if url else LocalBackend(model_repository, name, version)

    router = RolloutBackend(open_version, mode, production, candidate, share=share, seed=seed)
    try:
        info = router.info
        items, _ = iter_inputs(eval_data, split=split, class_names=info.class_names)
        batch, _, failed = read_images(items, info.size, info.channels, info.window)
        if failed:
            raise StepFailed(f"trial data {eval_data}: {len(failed)} unreadable image(s), e.g. {failed[0][0]}")
        for i in range(0, len(batch), batch_size):
            router.infer(batch[i:i + batch_size])
        return router.report()
    finally:
        router.close()


def trial(model_repository: str, name: str, version: int, mode: str, share: float, eval_data: str, split: str,
          limits: dict[str, float], auto_promote: bool, url: str = "") -> dict[str, Any]:
    """A canary or shadow trial of the new version beside production (``serve canary``/``shadow``), its figures
    checked against ``limits``. Verdict ``promote`` (limits kept and ``auto_promote``, or no production version yet),
    ``wait`` (limits kept, a person promotes: the trial keeps running) or ``refuse`` (a limit broken: trial ended)."""
    from serve import rollout

    state = rollout.read_state(model_repository, name)
    if state.production is None:
        return {"verdict": "promote", "figures": {"mode": "none"},
                "reason": f"no production version of {name} yet: nothing to trial against, the gate decides"}
    rollout.start_trial(model_repository, name, version, mode, share=share, url=url or None)
    report = trial_traffic(model_repository, name, state.production, version, mode, share, eval_data, split, url)
    failures = trial_limits_failures(report, limits)
    by_role = {v["role"]: v for v in report["versions"].values()}
    figures = {"mode": mode, "share": share, "production_version": state.production,
               **{f"{role}_requests": v["requests"] for role, v in by_role.items()},
               "candidate_p95_ms": (by_role.get("candidate", {}).get("latency_ms") or {}).get("p95"),
               "shadow_agreement": (report.get("shadow") or {}).get("agreement")}
    if failures:
        rollout.end_trial(model_repository, name, url=url or None)
        return {"verdict": "refuse", "status": "stopped", "figures": figures, "trial": report,
                "reason": f"{mode} of v{version} broke its limits (trial ended): " + "; ".join(failures)}
    if not auto_promote:
        return {"verdict": "wait", "figures": figures, "trial": report,
                "reason": f"{mode} of v{version} kept its limits and keeps running; a person promotes it: "
                          f"python -m serve promote {name} {version} --model-repository {model_repository} "
                          f"--eval-data {eval_data}"}
    return {"verdict": "promote", "figures": figures, "trial": report,
            "reason": f"{mode} of v{version} kept its limits: promoting"}


def promote(model_repository: str, name: str, version: int, eval_data: str, split: str = "test",
            tolerance: float = 0.01, url: str = "") -> dict[str, Any]:
    """``serve promote``: the version becomes production if the gate passes again (recorded in ``history.jsonl``)."""
    from serve import rollout

    entry = rollout.promote(model_repository, name, version, data=eval_data, split=split, tolerance=tolerance,
                            url=url or None)
    promoted = entry["decision"] == "promoted"
    return {"promoted": promoted, "status": "done" if promoted else "stopped",
            "reason": f"{name} v{version} " + ("is production" if promoted else "refused by the gate: "
                                                + "; ".join(entry["gate"]["reasons"])),
            "figures": {"production_version": version if promoted else entry.get("from"),
                        "previous_version": entry.get("from")}}
