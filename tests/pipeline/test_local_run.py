"""``python -m pipeline run``: the one pipeline definition run end to end by kfp's local runner at tiny size, a
failed step retried without redoing the steps before it, and a gate that says no stopping the run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.pipeline.conftest import PipelineRuns, pipeline_cli, record_of, sets

pytest.importorskip("kfp", reason="the pipeline extra is not installed")
pytestmark = pytest.mark.slow
STEPS = ("validate", "train", "evaluate", "export", "gate", "trial", "promote")


def test_failed_step_is_recorded_with_its_reason(pipeline_runs: PipelineRuns) -> None:
    proc = pipeline_runs.failed
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = record_of(pipeline_runs.tmp, "ct-failed")
    assert record["status"] == "failed" and record["engine"] == "local"
    assert [record["steps"][s]["status"] for s in ("validate", "train", "evaluate", "export")] == \
        ["done", "done", "done", "failed"]
    assert "TensorRT" in record["steps"]["export"]["reason"] and "export" in record["reason"]
    assert "model_version" not in record["lineage"] and "decision" not in record["lineage"]  # nothing exported
    assert "failed" in proc.stdout and "TensorRT" in proc.stdout  # the summary table says which step and why


def test_retry_reuses_finished_steps_and_promotes(pipeline_runs: PipelineRuns) -> None:
    proc = pipeline_runs.retried
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    failed, record = record_of(pipeline_runs.tmp, "ct-failed"), record_of(pipeline_runs.tmp, "ct-retried")
    assert record["status"] == "completed"
    assert {s: record["steps"][s]["status"] for s in STEPS} == {
        "validate": "cached", "train": "cached", "evaluate": "cached", "export": "done", "gate": "done",
        "trial": "done", "promote": "done"}
    # the same training run as the failed attempt: not trained again
    run_dir = Path(record["lineage"]["run_dir"])
    assert run_dir == Path(failed["steps"]["train"]["outputs"]["run_dir"])
    run_json = json.loads((run_dir / "run.json").read_text())
    lineage = record["lineage"]
    assert lineage["data_fingerprint"] == run_json["data"]["fingerprint"] and lineage["run_id"] == run_json["run_id"]
    dvc_md5 = hashlib.md5(pipeline_runs.data.read_bytes()).hexdigest()  # the data's DVC version, in both records
    assert lineage["data_version"]["tool"] == "dvc" and lineage["data_version"]["md5"] == dvc_md5
    assert run_json["data"]["tracked_version"]["md5"] == dvc_md5
    meta = json.loads((pipeline_runs.repository / "breastmnist_ct" / "1" / "metadata.json").read_text())
    assert meta["lineage"]["run_id"] == run_json["run_id"] and meta["parity"][0]["passed"]
    assert lineage["model_version"] == 1 and lineage["decision"] == "promoted: v1 is production"
    assert record["steps"]["train"]["figures"]["auroc"] == pytest.approx(run_json["test"]["auroc"])
    rollout = json.loads((pipeline_runs.repository / "breastmnist_ct" / "rollout.json").read_text())
    assert rollout["production"] == 1
    table = proc.stdout
    for step in STEPS:
        assert step in table
    assert "cached" in table and "completed" in table and "promoted: v1 is production" in table


def test_gate_that_says_no_stops_the_run_and_promotes_nothing(pipeline_runs: PipelineRuns) -> None:
    """A gate asking more than the candidate can give (tolerance -1: one full AUROC point better than production)
    refuses: the run stops with the reason and both versions' figures recorded, and production stays as it was."""
    repo = pipeline_runs.repository / "breastmnist_ct"
    assert pipeline_runs.retried.returncode == 0
    before = json.loads((repo / "rollout.json").read_text())
    proc = pipeline_cli("run", "--run-id", "ct-refused", *sets(pipeline_runs.overrides("gate.tolerance=-1")))
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = record_of(pipeline_runs.tmp, "ct-refused")
    assert record["status"] == "stopped" and record["reason"].startswith("gate:")
    gate = record["steps"]["gate"]
    assert gate["status"] == "stopped" and "worse" in gate["reason"]
    assert gate["figures"]["candidate_auroc"] is not None and gate["figures"]["production_auroc"] is not None
    assert gate["figures"]["production_version"] == before["production"]
    assert record["steps"]["trial"]["status"] == record["steps"]["promote"]["status"] == "skipped"
    assert record["lineage"]["decision"] == "refused by the gate: nothing promoted"
    after = json.loads((repo / "rollout.json").read_text())
    assert (after["production"], after["candidate"]) == (before["production"], before["candidate"])
    history = [json.loads(line) for line in (repo / "history.jsonl").read_text().splitlines()]
    refused = history[-1]
    assert refused["action"] == "pipeline gate" and refused["decision"] == "refused"
    assert refused["to"] == record["lineage"]["model_version"]
    assert "stopped" in proc.stdout and "refused by the gate" in proc.stdout


def test_kfp_ui_artifacts_hold_the_figures_a_reviewer_reads(pipeline_runs: PipelineRuns) -> None:
    """What the KFP UI shows for the evaluate and export steps: ROC curve and confusion matrix of the positive class
    (malignant), the headline metrics, the HTML report, and the model artifact with its lineage."""
    outputs = {}  # step -> its output artifacts (steps with parameter outputs only have none)
    for path in sorted((pipeline_runs.tmp / "kfp").glob("*/*-op/executor_output.json")):
        outputs.setdefault(path.parent.name, {}).update(json.loads(path.read_text()).get("artifacts") or {})
    evaluate = outputs["evaluate-op"]
    classification = evaluate["classification"]["artifacts"][0]["metadata"]
    roc = classification["confidenceMetrics"]
    assert len(roc) >= 3 and {"confidenceThreshold", "recall", "falsePositiveRate"} <= set(roc[0])
    assert roc[-1]["recall"] == pytest.approx(1.0) and roc[0]["recall"] <= roc[-1]["recall"]
    matrix = classification["confusionMatrix"]
    assert [c["displayName"] for c in matrix["annotationSpecs"]] == ["malignant", "normal_or_benign"]
    assert sum(sum(row["row"]) for row in matrix["rows"]) == 64  # the slice's test split
    metrics = evaluate["metrics"]["artifacts"][0]["metadata"]
    assert {"test_auroc", "test_sensitivity", "test_specificity"} <= set(metrics)
    report = Path(evaluate["report"]["artifacts"][0]["uri"])
    assert "<html" in report.read_text()[:500].lower() and "malignant" in report.read_text()
    model = outputs["export-op"]["model"]["artifacts"][0]
    assert model["metadata"]["name"] == "breastmnist_ct" and model["metadata"]["lineage"]["run_id"]
    assert (Path(model["uri"]) / "model.onnx").is_file() and (Path(model["uri"]) / "metadata.json").is_file()
