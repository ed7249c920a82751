"""End to end on CPU: drifted traffic through a real Triton -> the served model's drift alarm -> the Alertmanager
webhook receiver -> a pipeline run -> a new model version -> gate -> canary on that Triton.

Prometheus and Alertmanager do not run here: the test evaluates the alert rule's expression
(``max by (model, version) (medops_drift_detected) == 1``, deploy/monitoring/drift-alerts.yaml) on Triton's real
metrics and posts what Alertmanager would post for it. Everything after that is the real thing: the receiver's
HTTP server, ``python -m pipeline run`` started by it, kfp's local runner, export, the gate and a canary that
reloads the model on the running Triton."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.definition import load_config
from pipeline.triggers import AlertReceiver
from serve.client import TritonBackend
from serve.triton_server import TritonServer, free_port
from tests.conftest import REPO
from tests.pipeline.conftest import PipelineRuns, record_of

pytest.importorskip("kfp", reason="the pipeline extra is not installed")
pytestmark = pytest.mark.slow
MODEL = "breastmnist_ct"


def firing_drift_alerts(metrics_url: str) -> list[dict]:
    """What Alertmanager sends for MedopsInputDrift: one firing alert per (model, version) whose
    ``medops_drift_detected`` gauge is 1 (the rule's expression, evaluated on the scraped metrics)."""
    rules = yaml.safe_load((REPO / "deploy" / "monitoring" / "drift-alerts.yaml").read_text())
    rule = next(r for g in rules["groups"] for r in g["rules"] if r["alert"] == "MedopsInputDrift")
    assert rule["expr"] == "max by (model, version) (medops_drift_detected) == 1"
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    detected: dict[tuple[str, str], float] = {}  # max by (model, version) over the stubs' series
    for line in text.splitlines():
        match = re.match(r'medops_drift_detected\{model="([^"]+)",stub="\d+",version="(\d+)"\} (\S+)', line)
        if match:
            key = (match.group(1), match.group(2))
            detected[key] = max(detected.get(key, 0.0), float(match.group(3)))
    return [{"status": "firing", "labels": {"alertname": "MedopsInputDrift", "model": model, "version": version,
                                            "severity": "warning"},
             "annotations": {"summary": f"{model} v{version}: inputs drifted"}, "startsAt": "2026-11-28T00:00:00Z"}
            for (model, version), value in detected.items() if value == 1]


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_drift_alarm_starts_one_run_that_ends_in_a_canary(pipeline_runs: PipelineRuns, tmp_path: Path) -> None:
    assert pipeline_runs.retried.returncode == 0, pipeline_runs.retried.stdout[-2000:]
    repo = pipeline_runs.repository
    production = json.loads((repo / MODEL / "rollout.json").read_text())["production"]
    server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          model_control="explicit", load_models=[MODEL])
    server.start(timeout=120)
    receiver_http = None
    try:
        test = np.load(pipeline_runs.data)["test_images"].astype(np.float32)[:, None] / 255
        client = TritonBackend(server.http_url, MODEL, version=production)
        for _ in range(3):  # brighter scans (an acquisition change): the served model's drift alarm trips
            for i in range(0, len(test), 16):
                client.infer(np.clip(test[i:i + 16] + 40 / 255, 0, 1).astype(np.float32))
        client.close()
        alerts = firing_drift_alerts(server.metrics_url)
        assert [a["labels"]["model"] for a in alerts] == [MODEL]

        overrides = pipeline_runs.overrides(f"trial.triton_url={server.http_url}", "trial.auto_promote=false",
                                            "trial.share=0.5")
        cfg = load_config(overrides=[*overrides, f"triggers.drift.state={tmp_path / 'receiver.json'}"])
        receiver = AlertReceiver(cfg, overrides=overrides)
        receiver_http = receiver.serve("127.0.0.1", 0)
        import threading

        threading.Thread(target=receiver_http.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{receiver_http.server_address[1]}/alerts"
        payload = {"version": "4", "status": "firing", "receiver": "medops-pipeline", "alerts": alerts}
        first, again = post(url, payload), post(url, payload)  # Alertmanager repeats a firing alert
        assert first["decisions"][0]["decision"] == "started"
        assert again["decisions"][0]["decision"].startswith("cooling down")
        assert len(receiver.started) == 1  # one incident, one run
        proc = receiver.started[0]["process"]
        assert proc.wait(timeout=900) == 0, Path(receiver.started[0]["log"]).read_text()[-4000:]

        run_id = next(p.parent.name for p in (pipeline_runs.tmp / "records").glob("ct-*/pipeline.json")
                      if json.loads(p.read_text())["trigger"].get("kind") == "drift_alert")
        record = record_of(pipeline_runs.tmp, run_id)
        assert record["trigger"]["alert"] == "MedopsInputDrift" and record["trigger"]["model"] == MODEL
        assert record["status"] == "completed"
        new = record["lineage"]["model_version"]
        assert new > production
        assert record["steps"]["gate"]["status"] == "done" and record["steps"]["trial"]["status"] == "done"
        assert record["steps"]["trial"]["figures"]["candidate_requests"] >= 1
        assert record["steps"]["promote"]["status"] == "skipped"
        assert record["lineage"]["decision"] == "canary running, waiting for a person"
        state = json.loads((repo / MODEL / "rollout.json").read_text())
        assert (state["production"], state["candidate"], state["mode"]) == (production, new, "canary")
        import tritonclient.http as httpclient

        with httpclient.InferenceServerClient(server.http_url) as triton:
            ready = {int(m["version"]) for m in triton.get_model_repository_index()
                     if m.get("name") == MODEL and m.get("state") == "READY"}
        assert ready == {production, new}  # the running Triton serves the canary beside production
    finally:
        if receiver_http is not None:
            receiver_http.shutdown()
            receiver_http.server_close()
        server.stop()
