"""Triggers: a data-version diff above the configured size, Alertmanager webhooks with a cool-down per incident.
Which run they start is recorded by a stand-in starter here (the real start, ``python -m pipeline run`` from the
receiver, runs end to end in test_drift_to_canary.py)."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.definition import load_config
from pipeline.triggers import AlertReceiver, data_version_trigger
from tests.conftest import write_medmnist


def dataset(path: Path, n_train: int, relabel: int = 0, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (n_train + 40, 28, 28), dtype=np.uint8)
    labels = np.arange(n_train + 40) % 2
    labels[:relabel] = 1 - labels[:relabel]
    return write_medmnist(path, {"train": (images[:n_train], labels[:n_train]),
                                 "val": (images[n_train:n_train + 20], labels[n_train:n_train + 20]),
                                 "test": (images[n_train + 20:], labels[n_train + 20:])})


class Starts:
    def __init__(self) -> None:
        self.triggers: list[dict[str, Any]] = []

    def __call__(self, trigger: dict[str, Any]) -> dict[str, Any]:
        self.triggers.append(trigger)
        return {"engine": "test", "n": len(self.triggers)}


def test_data_version_diff_above_the_limit_starts_a_run(tmp_path: Path) -> None:
    cfg = load_config(overrides=[f"triggers.data_version.manifest={tmp_path / 'last.csv'}",
                                 "triggers.data_version.min_changed=10", "triggers.data_version.min_fraction=0.5"])
    starts = Starts()
    v1 = dataset(tmp_path / "v1.npz", 200)
    first = data_version_trigger(cfg, data=v1, start=starts)
    assert first["start"] and "first run" in first["reason"] and (tmp_path / "last.csv").is_file()
    small = data_version_trigger(cfg, data=dataset(tmp_path / "v2.npz", 200, relabel=5), start=starts)
    assert not small["start"] and small["counts"]["changed_label"] == 5 and "below" in small["reason"]
    big = data_version_trigger(cfg, data=dataset(tmp_path / "v3.npz", 230, relabel=12), start=starts)
    assert big["start"] and big["counts"]["added"] == 30 and big["counts"]["changed_label"] >= 10
    assert [t["kind"] for t in starts.triggers] == ["data_version", "data_version"]
    assert starts.triggers[1]["counts"] == big["counts"]
    again = data_version_trigger(cfg, data=tmp_path / "v3.npz", start=starts)  # the manifest moved on with the run
    assert not again["start"] and sum(again["counts"].values()) == 0


@pytest.fixture
def receiver(tmp_path: Path):
    cfg = load_config(overrides=[f"triggers.drift.state={tmp_path / 'state.json'}", "triggers.drift.cooldown_s=600"])
    clock = {"now": 1000.0}
    starts = Starts()
    rec = AlertReceiver(cfg, start=starts, clock=lambda: clock["now"])
    server = rec.serve("127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield rec, f"http://127.0.0.1:{server.server_address[1]}", starts, clock, cfg
    server.shutdown()
    server.server_close()


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def alert(name: str = "MedopsInputDrift", model: str = "breastmnist_ct", status: str = "firing") -> dict:
    return {"status": status, "labels": {"alertname": name, "model": model, "version": "1"},
            "annotations": {"summary": "drift"}, "startsAt": "2026-11-28T00:00:00Z"}


def payload(*alerts: dict) -> bytes:
    return json.dumps({"version": "4", "status": "firing", "alerts": list(alerts)}).encode()


def test_one_incident_starts_one_run(receiver) -> None:
    rec, url, starts, clock, _ = receiver
    code, body = post(f"{url}/alerts", payload(alert()))
    assert code == 200 and body["decisions"][0]["decision"] == "started"
    clock["now"] += 300  # Alertmanager repeats the firing alert within the cool-down
    code, body = post(f"{url}/alerts", payload(alert(), alert(model="other_model")))
    assert [d["decision"].split(":")[0] for d in body["decisions"]] == ["cooling down", "started"]
    clock["now"] += 400  # a new incident after the cool-down
    _, body = post(f"{url}/alerts", payload(alert()))
    assert body["decisions"][0]["decision"] == "started"
    assert [(t["kind"], t["model"]) for t in starts.triggers] == [
        ("drift_alert", "breastmnist_ct"), ("drift_alert", "other_model"), ("drift_alert", "breastmnist_ct")]


def test_resolved_and_other_alerts_start_nothing(receiver) -> None:
    _, url, starts, _, _ = receiver
    _, body = post(f"{url}/alerts", payload(alert(status="resolved"), alert(name="MedopsDriftMonitorSilent")))
    assert [d["decision"] for d in body["decisions"]] == ["ignored: resolved", "ignored: not a drift alert"]
    assert starts.triggers == []


def test_malformed_requests_get_a_400_and_the_receiver_stays_up(receiver) -> None:
    _, url, starts, _, _ = receiver
    assert post(f"{url}/alerts", b"{not json")[0] == 400
    code, body = post(f"{url}/alerts", b'{"version": "4"}')
    assert code == 400 and "alerts" in body["error"]
    assert post(f"{url}/alerts", payload({"status": "firing"}))[0] == 400
    assert post(f"{url}/elsewhere", payload(alert()))[0] == 404
    with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok"}
    assert starts.triggers == []


def test_cool_down_survives_a_restart(receiver) -> None:
    rec, url, starts, clock, cfg = receiver
    post(f"{url}/alerts", payload(alert()))
    restarted = AlertReceiver(cfg, start=starts, clock=lambda: clock["now"] + 60)
    assert restarted.handle([alert()])[0]["decision"].startswith("cooling down")
    assert len(starts.triggers) == 1
