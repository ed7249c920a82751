"""What starts a pipeline run without a person: new data, a drift alarm, a schedule.

* **New data** (:func:`data_version_trigger`): the manifest of the data now (``datatools.data_version``) against
  the manifest of the data the last run trained on; a run starts when the entries added, removed, relabelled, moved
  between splits or changed reach ``triggers.data_version.min_changed`` or ``min_fraction`` of the old entries.
* **Drift** (:class:`AlertReceiver`): a small HTTP receiver for Alertmanager's webhook (``POST /alerts``, the
  ``version: "4"`` payload). A firing ``MedopsInputDrift`` / ``MedopsSevereDrift`` alert (the rules on
  ``medops_drift_detected`` in ``deploy/monitoring/drift-alerts.yaml``) starts one run per incident: later alerts
  for the same model within ``cooldown_s`` start nothing (the state survives restarts). Resolved alerts and other
  alert names are acknowledged and ignored; a malformed body gets a 400 with the reason.
* **Schedule**: a KFP recurring run (``python -m pipeline schedule``) or the Airflow DAG's ``schedule``.

A run is started on the configured engine (:func:`start_run`): ``local`` starts ``python -m pipeline run`` as a
background process (its output in ``<records_dir>/triggered-<time>.log``), ``kfp`` submits to ``kfp.host``.
The receiver uses the standard library's HTTP server on purpose: it answers a handful of small POSTs, and the
project needs no web framework for that.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from medops.model_version import write_json

Starter = Callable[[dict[str, Any]], dict[str, Any]]


# -- starting a run ------------------------------------------------------------------------------------------------
def start_run(cfg: DictConfig, trigger: dict[str, Any], overrides: list[str] | None = None) -> dict[str, Any]:
    """Start a pipeline run on ``triggers.engine`` for ``trigger``; returns what was started (a local process id
    and its log, or the KFP run id)."""
    engine = str(cfg.triggers.engine)
    overrides = list(overrides or [])
    if engine == "kfp":
        from pipeline.__main__ import submit_run

        run_id = submit_run(cfg, host=str(cfg.kfp.host), trigger=trigger)
        return {"engine": "kfp", "run_id": run_id}
    if engine != "local":
        raise ValueError(f"triggers.engine must be local or kfp, got {engine!r}")
    from pipeline.definition import REPO

    records = Path(str(cfg.records_dir))
    records = records if records.is_absolute() else REPO / records
    records.mkdir(parents=True, exist_ok=True)
    log = records / f"triggered-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}.log"
    cmd = [sys.executable, "-m", "pipeline", "run", "--trigger", json.dumps(trigger)]
    cmd += [x for o in overrides for x in ("--set", o)]
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    return {"engine": "local", "pid": proc.pid, "log": str(log), "process": proc}


# -- new data ------------------------------------------------------------------------------------------------------
def data_version_trigger(cfg: DictConfig, data: str | Path | None = None, manifest: str | Path | None = None,
                         start: Starter | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Compare the data's manifest with the last run's; start a run when the change is large enough. Returns the
    diff counts, the decision and, when a run started, what ``start`` returned. The first call (no manifest yet)
    starts a run and keeps the manifest."""
    from datatools.data_version import diff_manifests, manifest_entries, read_data_manifest, write_manifest

    settings = cfg.triggers.data_version
    data = Path(str(data or cfg.data))
    manifest = Path(str(manifest or settings.manifest))
    rows = manifest_entries(data)
    new = {r["path"]: r for r in rows}
    if manifest.is_file():
        diff = diff_manifests(read_data_manifest(manifest), new)
        changed = sum(diff["counts"].values())
        fraction = changed / max(1, diff["old_entries"])
        start_it = changed >= int(settings.min_changed) or fraction >= float(settings.min_fraction)
        why = (f"{changed} changed entries ({fraction:.1%} of {diff['old_entries']}): "
               + ("start" if start_it else "below") + f" the limits ({settings.min_changed} entries or "
               f"{float(settings.min_fraction):.0%})")
    else:
        diff, start_it, why = None, True, f"no manifest at {manifest}: the first run"
    result: dict[str, Any] = {"data": str(data), "counts": diff["counts"] if diff else None, "start": start_it,
                              "reason": why}
    if start_it:
        trigger = {"kind": "data_version", "data": str(data), "counts": result["counts"], "reason": why}
        result["run"] = (start or (lambda t: start_run(cfg, t, overrides)))(trigger)
        write_manifest(rows, manifest)  # the next diff is against the data this run trains on
    return result


# -- drift alerts (Alertmanager webhook) ---------------------------------------------------------------------------
class AlertError(ValueError):
    """A request body that is not an Alertmanager webhook payload; the message says why."""


def parse_alerts(body: bytes) -> list[dict[str, Any]]:
    """The alerts of an Alertmanager webhook payload (``{"version": "4", "alerts": [...]}``)."""
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise AlertError(f"body is not JSON: {exc}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("alerts"), list):
        raise AlertError("not an Alertmanager webhook payload: no 'alerts' list")
    for alert in payload["alerts"]:
        if not isinstance(alert, dict) or not isinstance(alert.get("labels"), dict):
            raise AlertError("every alert needs a 'labels' object")
    return payload["alerts"]


class AlertReceiver:
    """Turns firing drift alerts into pipeline runs, one per incident (cool-down per model)."""

    def __init__(self, cfg: DictConfig, start: Starter | None = None, overrides: list[str] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        settings = cfg.triggers.drift
        self.alerts = set(settings.alerts)
        self.cooldown = float(settings.cooldown_s)
        self.state_file = Path(str(settings.state))
        self.start = start or (lambda trigger: start_run(cfg, trigger, overrides))
        self.clock, self.lock = clock, threading.Lock()
        self.started: list[dict[str, Any]] = []
        self.last: dict[str, float] = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}

    def handle(self, alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The decision for each alert: started (with what), cooling down, resolved or not a drift alert."""
        decisions = []
        for alert in alerts:
            labels = alert["labels"]
            name, model = labels.get("alertname"), labels.get("model", "")
            if name not in self.alerts:
                decisions.append({"alert": name, "decision": "ignored: not a drift alert"})
                continue
            if alert.get("status", "firing") != "firing":
                decisions.append({"alert": name, "model": model, "decision": "ignored: resolved"})
                continue
            decisions.append(self._maybe_start(alert, name, model))
        return decisions

    def _maybe_start(self, alert: dict[str, Any], name: str, model: str) -> dict[str, Any]:
        with self.lock:
            now = self.clock()
            since = now - self.last.get(model, float("-inf"))
            if since < self.cooldown:
                return {"alert": name, "model": model, "decision": f"cooling down: a run started {since:.0f} s ago "
                                                                   f"(cool-down {self.cooldown:.0f} s)"}
            self.last[model] = now
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.state_file, self.last)
        trigger = {"kind": "drift_alert", "alert": name, "model": model, "version": alert["labels"].get("version"),
                   "starts_at": alert.get("startsAt"), "summary": (alert.get("annotations") or {}).get("summary")}
        started = self.start(trigger)
        self.started.append(started)
        return {"alert": name, "model": model, "decision": "started",
                "run": {k: v for k, v in started.items() if k != "process"}}

    def serve(self, host: str, port: int) -> ThreadingHTTPServer:
        """An HTTP server (not yet serving: call ``serve_forever``) with ``POST /alerts`` and ``GET /healthz``."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                self._reply(200, {"status": "ok"} if self.path == "/healthz" else {"error": "not found"})

            def do_POST(self) -> None:  # noqa: N802
                if self.path.rstrip("/") != "/alerts":
                    self._reply(404, {"error": f"unknown path {self.path}; POST Alertmanager webhooks to /alerts"})
                    return
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    alerts = parse_alerts(self.rfile.read(min(length, 1 << 20)))
                except (AlertError, ValueError) as exc:
                    self._reply(400, {"error": str(exc)})
                    return
                self._reply(200, {"decisions": receiver.handle(alerts)})

            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body, default=str).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # the decisions are the log

        return ThreadingHTTPServer((host, port), Handler)
