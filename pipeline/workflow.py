"""The steps for engines without kfp artifacts (the Airflow DAG in ``deploy/airflow``): each step gets a context
(the pipeline arguments of :func:`pipeline.definition.arguments` and the results of the steps before it), runs the
step of :mod:`pipeline.steps` in ``<records_dir>/<pipeline run>/<step>/`` and records it in the pipeline record.

Airflow passes the results from task to task as XComs (small JSON dicts: run folder, model version, figures), the
counterpart of kfp's artifacts. ``python -m pipeline step NAME --context JSON`` runs one step in a container (the
DAG's KubernetesPodOperator mode) and writes its result where the pod operator reads XComs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medops import pipeline_record as pr
from pipeline import steps

ORDER = ("begin", "validate", "train", "evaluate", "export", "gate", "trial", "promote", "finalize")


def _folder(ctx: dict[str, Any], step: str) -> str:
    folder = Path(ctx["args"]["records_dir"]) / ctx["args"]["pipeline_run"] / step
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


def _jsonable(result: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({k: v for k, v in result.items() if k != "trial"}, default=str))


def run_step(step: str, ctx: dict[str, Any]) -> dict[str, Any]:
    """Run one step with its context; returns its JSON-ready result (the XCom)."""
    a = ctx["args"]
    target = (a["records_dir"], a["pipeline_run"])
    if step == "begin":
        pr.start_record(*target, engine=a["engine"], trigger=a["trigger"], parameters={
            k: a[k] for k in ("data", "data_version", "train_overrides", "model_name", "eval_data", "trial_mode",
                              "auto_promote")})
        return {"pipeline_run": a["pipeline_run"]}
    if step == "finalize":
        return {"status": finalize(target)}
    result = RUNNERS[step](ctx, target)
    return _jsonable(result)


def _validate(ctx: dict[str, Any], target: tuple[str, str]) -> dict[str, Any]:
    a = ctx["args"]
    result = steps.recorded("validate", target, steps.validate, a["data"], _folder(ctx, "validate"), a["data_config"],
                            list(a["data_overrides"]))
    pr.record_lineage(*target, data=result["data"], data_fingerprint=result["fingerprint"],
                      data_version=result["data_version"])
    return result


def _train(ctx: dict[str, Any], target: tuple[str, str]) -> dict[str, Any]:
    a = ctx["args"]
    result = steps.recorded("train", target, steps.train, ctx["validate"]["data"], _folder(ctx, "train"),
                            list(a["train_overrides"]), a["data_config"], list(a["data_overrides"]), a["task_name"])
    pr.record_lineage(*target, run_id=result["run_id"], run_dir=result["run_dir"])
    return result


def _evaluate(ctx: dict[str, Any], target: tuple[str, str]) -> dict[str, Any]:
    return steps.recorded("evaluate", target, steps.evaluate, ctx["train"]["run_dir"], _folder(ctx, "evaluate"),
                          int(ctx["args"]["n_resamples"]))


def _export(ctx: dict[str, Any], target: tuple[str, str]) -> dict[str, Any]:
    a = ctx["args"]
    result = steps.recorded("export", target, steps.export, ctx["train"]["run_dir"], _folder(ctx, "evaluate"),
                            a["model_name"], a["model_repository"], _folder(ctx, "export"),
                            list(a["export_overrides"]))
    pr.record_lineage(*target, model=result["name"], model_version=result["version"],
                      model_repository=result["model_repository"])
    return result


def _gate(ctx: dict[str, Any], target: tuple[str, str]) -> dict[str, Any]:
    a, model = ctx["args"], ctx["export"]
    result = steps.recorded("gate", target, steps.gate, model["model_repository"], model["name"], model["version"],
                            a["eval_data"], a["eval_split"], float(a["gate_tolerance"]))
    if not result["passed"]:
        for step in ("trial", "promote"):
            pr.record_step(*target, step, status="skipped", reason="the gate said no")
        pr.record_lineage(*target, decision="refused by the gate: nothing promoted")
    return result


def _trial(ctx: dict[str, Any], target: tuple[str, str]) -> dict[str, Any]:
    a, model = ctx["args"], ctx["export"]
    result = steps.recorded("trial", target, steps.trial, model["model_repository"], model["name"], model["version"],
                            a["trial_mode"], float(a["canary_share"]), a["eval_data"], a["eval_split"],
                            dict(a["trial_limits"]), bool(a["auto_promote"]), a["triton_url"])
    if result["verdict"] != "promote":
        decision = {"wait": f"{a['trial_mode']} running, waiting for a person",
                    "refuse": f"{a['trial_mode']} refused: nothing promoted"}[result["verdict"]]
        pr.record_step(*target, "promote", status="skipped", reason=result["reason"])
        pr.record_lineage(*target, decision=decision)
    return result


def _promote(ctx: dict[str, Any], target: tuple[str, str]) -> dict[str, Any]:
    a, model = ctx["args"], ctx["export"]
    result = steps.recorded("promote", target, steps.promote, model["model_repository"], model["name"],
                            model["version"], a["eval_data"], a["eval_split"], float(a["gate_tolerance"]),
                            a["triton_url"])
    pr.record_lineage(*target, decision=(f"promoted: v{model['version']} is production" if result["promoted"]
                                         else "refused at promotion: nothing promoted"))
    return result


RUNNERS = {"validate": _validate, "train": _train, "evaluate": _evaluate, "export": _export, "gate": _gate,
           "trial": _trial, "promote": _promote}


def finalize(target: tuple[str, str]) -> str:
    """The run's end from its record: a step left ``running`` (killed) or ``failed`` makes it failed."""
    from pipeline.adapters import finalize_impl

    path = pr.record_path(*target)
    entries = pr.read_pipeline_record(path).steps if path.is_file() else {}
    crashed = [s for s, e in entries.items() if e.get("status") == "running"]
    for step in crashed:
        pr.record_step(*target, step, status="failed", reason="the task ended without recording a result")
    return finalize_impl(*target, "", "FAILED" if crashed else "SUCCEEDED", "")
