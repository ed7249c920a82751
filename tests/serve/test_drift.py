"""Drift monitoring on real shifts: the offline ``serve drift`` check and the served model's Prometheus gauges."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import medops
from serve.client import TritonBackend
from serve.drift import run_drift
from serve.triton_server import TritonServer, free_port
from tests.conftest import BREASTMNIST, REPO

MODEL = "breast"
NIFTI = REPO / "tests" / "data" / "nifti"


def shifted(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    np.savez(path, test_images=images, test_labels=labels.reshape(-1, 1))
    return path


@pytest.fixture(scope="module")
def shifts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The BreastMNIST test split with real acquisition-like shifts, and a different dataset (MR slices)."""
    tmp = tmp_path_factory.mktemp("shifts")
    data = np.load(BREASTMNIST)
    images, labels = data["test_images"], data["test_labels"].reshape(-1)
    grey = images.astype(np.float64)
    rng = np.random.default_rng(0)
    mr = [medops.resize(s, 28)[..., 0] for axis in (0, 1, 2) for s in medops.nifti_slices(NIFTI / "anatomical.nii",
                                                                                          axis=axis)]
    mr += [medops.resize(s, 28)[..., 0] for s in medops.nifti_slices(NIFTI / "example_nifti2.nii.gz")]
    return {
        "brighter": shifted(tmp / "brighter.npz", np.clip(grey + 40, 0, 255).astype(np.uint8), labels),
        "lower contrast": shifted(tmp / "contrast.npz", np.clip(128 + (grey - 128) * 0.6, 0, 255).astype(np.uint8),
                                  labels),
        "noise": shifted(tmp / "noise.npz", np.clip(grey + rng.normal(0, 25, grey.shape), 0, 255).astype(np.uint8),
                         labels),
        "MR slices (another dataset)": shifted(tmp / "mr.npz", np.stack(mr), np.zeros(len(mr), np.int64)),
    }


def test_reference_profile_is_exported_with_the_version(exported_repo: Path):
    folder = exported_repo / MODEL / "1"
    for name in ("drift_reference.npz", "drift_core.py", "embedding.onnx"):
        assert (folder / name).is_file(), name
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["drift"]["reference"] == "val" and meta["drift"]["n"] > 30
    assert {"intensity_mean", "predicted_class", "image_height"} <= set(meta["drift"]["features"])
    assert "penultimate" in meta["drift"]["embeddings"]
    assert (folder / "drift_core.py").read_text() == (REPO / "medops" / "drift.py").read_text()
    card = (folder / "MODEL_CARD.md").read_text()
    assert "## Monitoring" in card and f"{meta['drift']['n']} images of the val split" in card


def test_every_real_shift_is_detected(exported_repo: Path, shifts: dict[str, Path]):
    for name, path in shifts.items():
        report = run_drift(path, exported_repo, MODEL)
        assert report.result.verdict == "drift", (name, report.as_dict())
        assert any(f.drifted for f in report.result.features), name


def test_same_distribution_is_not_drift_and_false_alarm_rate_is_low(exported_repo: Path):
    report = run_drift(BREASTMNIST, exported_repo, MODEL, split="test")
    assert report.result.verdict == "no drift", report.as_dict()
    assert report.result.embedding is not None and not report.result.embedding["drifted"]
    test_images = np.load(BREASTMNIST)["test_images"]
    rng = np.random.default_rng(0)
    windows = [test_images[rng.choice(len(test_images), 64, replace=False)] for _ in range(40)]
    rate = false_alarm_rate(windows, exported_repo, MODEL)
    print(f"false-alarm rate over {len(windows)} same-distribution windows of 64 images: {rate:.1%}")
    assert rate <= 0.1


def test_cli_writes_json_and_png_and_fails_on_drift_when_asked(exported_repo: Path, shifts: dict[str, Path],
                                                              tmp_path: Path):
    base = [sys.executable, "-m", "serve", "drift", "--name", MODEL, "--model-repository", str(exported_repo)]
    drifted = subprocess.run([*base, str(shifts["brighter"]), "--fail-on-drift", "--out", str(tmp_path / "d")],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert drifted.returncode == 3, drifted.stdout + drifted.stderr
    assert "verdict: drift" in drifted.stdout and "intensity_mean" in drifted.stdout
    result = json.loads((tmp_path / "d" / "drift.json").read_text())
    assert result["drifted"] and result["n_current"] == 156
    assert (tmp_path / "d" / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # without --fail-on-drift the verdict is reported but the exit code stays 0
    soft = subprocess.run([*base, str(shifts["brighter"]), "--out", str(tmp_path / "s")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert soft.returncode == 0 and "verdict: drift" in soft.stdout
    clean = subprocess.run([*base, str(BREASTMNIST), "--fail-on-drift", "--out", str(tmp_path / "c")], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0 and "verdict: no drift" in clean.stdout, clean.stdout + clean.stderr


def test_unreadable_files_are_reported_and_the_rest_compared(exported_repo: Path, tmp_path: Path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    images = np.load(BREASTMNIST)["test_images"][:40]
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    (folder / "999_broken.png").write_bytes(b"not a png")
    report = run_drift(folder, exported_repo, MODEL)
    assert [Path(p).name for p, _ in report.failed] == ["999_broken.png"]
    assert report.result.n_current == 40 and report.result.verdict in ("no drift", "drift")


def metric_lines(server: TritonServer) -> dict[str, float]:
    """medops_* series keyed without their ``stub`` label (one stub serves the model here), which every one has."""
    import re

    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("medops_"):
            key, value = line.rsplit(" ", 1)
            assert re.search(r'stub="\d+"', key), key  # per stub process: no series shared across a reload
            out[re.sub(r',stub="\d+"', "", key)] = float(value)
    return out


def test_served_model_exposes_drift_gauges_that_trip_on_a_shift(exported_repo: Path):
    data = np.load(BREASTMNIST)
    test = data["test_images"].astype(np.float32)[:, None] / 255
    brighter = np.clip(test + 40 / 255, 0, 1).astype(np.float32)
    server = TritonServer(exported_repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          model_control="explicit", load_models=[MODEL])
    server.start(timeout=120)
    try:
        started = metric_lines(server)  # after Triton's warm-up (an all-zeros image), before any client
        assert started.get(f'medops_ood_flagged_total{{model="{MODEL}",version="1"}}', 0) == 0
        assert started.get(f'medops_drift_window_images{{model="{MODEL}",version="1"}}', 0) == 0
        p_values = [v for k, v in started.items() if k.startswith("medops_drift_p_value")]
        assert p_values and np.isnan(p_values).all()  # no test yet: not a p-value of 0 on a dashboard
        import tritonclient.http as httpclient
        from tritonclient.utils import InferenceServerException

        raw = httpclient.InferInput("image", [2, 1, 28, 28], "FP32")  # an image sent as 0-255, past any client check
        raw.set_data_from_numpy(test[:2] * 255)
        with httpclient.InferenceServerClient(server.http_url) as plain, \
                pytest.raises(InferenceServerException, match=r"\[0, 1\]"):
            plain.infer(MODEL, [raw])
        refused = metric_lines(server)  # refused, and counted (Triton itself counts it as a success)
        assert refused[f'medops_input_refused_total{{model="{MODEL}",reason="values",version="1"}}'] == 1
        client = TritonBackend(server.http_url, MODEL)
        for i in range(0, len(test), 16):
            client.infer(test[i:i + 16])
        clean = metric_lines(server)
        detected = f'medops_drift_detected{{model="{MODEL}",version="1"}}'
        assert clean[detected] == 0
        assert clean[f'medops_drift_checks_total{{model="{MODEL}",version="1"}}'] >= 2
        # the gauges move with each drift test (every 32 images), not each batch: at most 31 images behind
        assert len(test) - 32 < clean[f'medops_drift_window_images{{model="{MODEL}",version="1"}}'] <= len(test) + 1
        shares = [v for k, v in clean.items() if k.startswith("medops_prediction_class_share")]
        assert len(shares) == 2 and sum(shares) == pytest.approx(1.0)
        # the stub's CPU-time counters: sent once 32 images are pending, onnxruntime's share within execute()'s
        images = clean[f'medops_execute_images_total{{model="{MODEL}",version="1"}}']
        execute = clean[f'medops_execute_cpu_seconds_total{{model="{MODEL}",version="1"}}']
        ort = clean[f'medops_onnxruntime_cpu_seconds_total{{model="{MODEL}",version="1"}}']
        assert len(test) - 32 < images <= len(test)
        assert 0 < ort <= execute < images  # and well under a second of CPU per image
        for _ in range(2):
            for i in range(0, len(brighter), 16):
                client.infer(brighter[i:i + 16])
        after = metric_lines(server)
        assert after[detected] == 1
        assert after[f'medops_drift_psi{{feature="intensity_mean",model="{MODEL}",version="1"}}'] > 0.2
        assert after[f'medops_input_intensity_mean{{model="{MODEL}",version="1"}}'] > \
            clean[f'medops_input_intensity_mean{{model="{MODEL}",version="1"}}']
        client.close()
    finally:
        server.stop()


MONITORING = REPO / "deploy" / "monitoring"


def referenced_metrics() -> set[str]:
    """Metric names used by the shipped alert rules and Grafana dashboard."""
    import re

    import yaml

    rules = yaml.safe_load((MONITORING / "drift-alerts.yaml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert {"alert", "expr", "for", "labels", "annotations"} <= set(rule), rule
            assert rule["labels"]["severity"] in ("info", "warning", "critical")
    dashboard = json.loads((MONITORING / "grafana-drift-dashboard.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return set(re.findall(r"\b((?:medops|nv)_[a-z_]+)\b", " ".join(exprs)))


def test_alert_rules_and_dashboard_use_metrics_the_server_exports(exported_repo: Path):
    names = referenced_metrics()
    assert {"medops_drift_detected", "medops_drift_score", "medops_drift_psi"} <= names
    server = TritonServer(exported_repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          model_control="explicit", load_models=[MODEL])
    server.start(timeout=120)
    try:
        client = TritonBackend(server.http_url, MODEL)
        client.infer(np.zeros((4, 1, 28, 28), np.float32))
        client.close()
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    finally:
        server.stop()
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert names <= exported, sorted(names - exported)


def false_alarm_rate(windows: list[np.ndarray], model_repository: str | Path, name: str, **kwargs: object) -> float:
    """Share of same-distribution windows (each an N x H x W[x C] uint8 array) flagged as drift."""
    alarms = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, window in enumerate(windows):
            path = Path(tmp) / f"w{i}.npz"
            np.savez(path, test_images=window, test_labels=np.zeros((len(window), 1), np.int64))
            alarms += run_drift(path, model_repository, name, seed=i, **kwargs).result.drifted
    return alarms / max(1, len(windows))
