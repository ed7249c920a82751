"""``python -m export ... quantize=int8``: a QDQ INT8 model.onnx chosen on the validation split and gated by clinical
figures against FP32 on the test split, served unchanged by Triton (Python backend) and ``serve --backend local``;
no candidate within the limits on validation, or a chosen one failing on test, publishes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image
from rich.console import Console

from export.build import clinical_evaluation, graph_network
from export.parity import torch_probabilities
from export.source import load_source
from medops import load_for_model
from medops.decision import metadata_rule
from medops.metrics import auroc, summary_metrics
from tests.conftest import REPO
from tests.export.test_export import parse_config, run_export_cli
from train.datamodules import MedMNISTDataModule

pytestmark = pytest.mark.slow

# the 2-epoch test model's probabilities crowd its threshold, so its gate is looser than the default (which the
# real model passes: docs/performance.md); what is checked here is that the figures are computed and enforced
LOOSE = ("quantization.gate.auroc=0.2", "quantization.gate.accuracy=0.3", "quantization.gate.decision_agreement=0.5",
         "quantization.methods=[minmax]", "quantization.keep_float=[[head]]", "drift.enabled=false")


@pytest.fixture(scope="module")
def int8_repo(tmp_path_factory: pytest.TempPathFactory, trained_run: Path) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("int8")
    batcher = tmp / "batcher.json"  # what `python -m bench latency --write-config` writes
    batcher.write_text(json.dumps({"max_queue_delay_us": 1234, "preferred_batch_sizes": [4, 8]}))
    proc = run_export_cli(f"run={trained_run}", "name=breast", f"model_repository={tmp / 'repo'}", "quantize=int8",
                          *LOOSE, f"triton.batcher_file={batcher}", log_dir=tmp / "log")
    return tmp / "repo", proc.stdout + proc.stderr


def test_int8_version_reports_the_gate_it_passed(int8_repo: tuple[Path, str], trained_run: Path) -> None:
    repo, out = int8_repo
    version = repo / "breast" / "1"
    model = onnx.load(str(version / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops, "not a QDQ graph"
    assert [o.name for o in model.graph.output] == ["probabilities", "ood_score", "ood_flag"]
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    # per-channel: the weight DequantizeLinear of each conv has one scale per output channel
    dq_scales = [init for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in conv_weights
                 for init in model.graph.initializer if init.name == n.input[1]]
    assert dq_scales and all(len(s.dims) == 1 and s.dims[0] > 1 for s in dq_scales)

    meta = json.loads((version / "metadata.json").read_text())
    precision = meta["precision"]
    assert precision["precision"] == "int8" and precision["format"] == "QDQ" and precision["per_channel"]
    assert precision["calibration"] == {"split": "val", "images": 78}
    choice, gate = precision["choice"], precision["gate"]
    assert choice["passed"] and gate["passed"]
    assert precision["method"] == "minmax" and precision["keep_float"] == ["head"]
    assert (choice["split"], gate["split"]) == ("val", "test")
    # the candidates carry validation figures only: the test split chose nothing
    assert [c["val"] for c in precision["candidates"]] == [choice]
    assert all(set(c) == {"method", "keep_float", "val"} for c in precision["candidates"])

    # the figures are what the FP32 checkpoint and the INT8 graph give on each split
    record = json.loads((trained_run / "run.json").read_text())
    source = load_source(str(trained_run))
    reference_net = graph_network(source, clinical_evaluation(source)[0], Console(quiet=True))
    dm = MedMNISTDataModule(record["data"]["source"], md5=False)
    dm.setup()
    int8 = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    positive = record["threshold"]["positive_index"]
    rule = metadata_rule(meta)
    for split, figures, n in (("val", choice, 78), ("test", gate, 64)):
        images = dm.datasets[split].images.float().div(255).numpy()
        labels = dm.datasets[split].labels.numpy()
        probs = int8.run(["probabilities"], {"image": images})[0]
        fp32 = torch_probabilities(reference_net, images)
        assert figures["images"] == len(labels) == n
        assert figures["auroc_int8"] == pytest.approx(auroc(probs, labels, positive), abs=1e-9)
        assert figures["accuracy_int8"] == pytest.approx(summary_metrics(probs, labels)["acc"], abs=1e-9)
        assert figures["auroc_fp32"] == pytest.approx(auroc(fp32, labels, positive), abs=1e-4)
        assert figures["decision_agreement"] == rule.agreement(fp32, probs)
    assert gate["auroc_fp32"] == pytest.approx(record["test"]["auroc"], abs=2e-3)  # FP32 graph vs training's eval
    op = meta["operating_point"]
    assert gate["decision"] == choice["decision"] == f"P({op['positive_class']}) >= {op['threshold']:.4f}"
    assert rule.decide(probs).dtype == bool

    line = [ln for ln in (version / "MODEL_CARD.md").read_text().splitlines() if "Precision:" in ln]
    assert len(line) == 1 and "INT8 (QDQ, per-channel" in line[0] and "calibrated on 78 val images" in line[0]
    assert f"chosen on 78 val images (AUROC {choice['auroc_diff']:+.4f}" in line[0]
    assert f"gate on 64 test images against FP32: AUROC {gate['auroc_fp32']:.4f} -> {gate['auroc_int8']:.4f}" in line[0]
    assert f"{gate['decision_agreement']:.2%}" in line[0]
    assert "Precision: INT8" in out and "chosen on val, on 64 test images" in out and "PASS" in out

    # the dynamic batcher settings come from the latency sweep's file
    config = parse_config(repo / "breast" / "config.pbtxt")
    assert config.dynamic_batching.max_queue_delay_microseconds == 1234
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]


def _failed_export(trained_run: Path, tmp_path: Path, *limits: str) -> tuple[str, Path]:
    repo = tmp_path / "repo"
    proc = run_export_cli(f"run={trained_run}", "name=breast", f"model_repository={repo}", "quantize=int8", *LOOSE,
                          *limits, log_dir=tmp_path / "log", check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stdout + proc.stderr
    assert "nothing was written" in err
    assert not (repo / "breast").exists() or not any((repo / "breast").iterdir())
    return err, repo


def test_no_candidate_within_the_limits_on_validation_stops_export(int8_repo: tuple[Path, str], trained_run: Path,
                                                                    tmp_path: Path) -> None:
    """No AUROC difference is within a negative limit: the choice on validation finds nothing, test is not used."""
    choice = json.loads((int8_repo[0] / "breast" / "1" / "metadata.json").read_text())["precision"]["choice"]
    err, _ = _failed_export(trained_run, tmp_path, "quantization.gate.auroc=-1")
    assert "no INT8 candidate passed the clinical gate's limits on the val split (the choice)" in err
    assert f"AUROC {choice['auroc_fp32']:.4f} -> {choice['auroc_int8']:.4f}" in err  # the validation figures
    assert f"same decision {choice['decision_agreement']:.2%}" in err
    assert "INT8 gate of" not in err  # the test split was never looked at


def _between_val_and_test(choice: dict, gate: dict) -> str | None:
    """A limit the validation figures meet and the test figures do not (MinMax is deterministic), if any."""
    if choice["decision_agreement"] > gate["decision_agreement"]:
        return f"quantization.gate.decision_agreement={(choice['decision_agreement'] + gate['decision_agreement']) / 2}"
    for figure, key in (("auroc_diff", "auroc"), ("accuracy_diff", "accuracy")):
        if abs(choice[figure]) < abs(gate[figure]):
            return f"quantization.gate.{key}={(abs(choice[figure]) + abs(gate[figure])) / 2}"
    return None


def test_chosen_candidate_failing_on_test_stops_export(int8_repo: tuple[Path, str], trained_run: Path,
                                                       tmp_path: Path) -> None:
    """The same candidate (MinMax is deterministic) against a limit between its validation and test figures: it is
    chosen on validation, then fails the gate on test, with its test figures in the message."""
    precision = json.loads((int8_repo[0] / "breast" / "1" / "metadata.json").read_text())["precision"]
    choice, gate = precision["choice"], precision["gate"]
    limit = _between_val_and_test(choice, gate)
    if limit is None:
        pytest.skip(f"every test figure of the 2-epoch model is as good as on validation: {choice} {gate}")
    err, _ = _failed_export(trained_run, tmp_path, limit)
    assert "the INT8 candidate chosen on the val split, minmax (float: head), failed the clinical gate on the test " \
           "split" in err
    assert f"AUROC {gate['auroc_fp32']:.4f} -> {gate['auroc_int8']:.4f}" in err  # the test figures
    assert f"accuracy {gate['accuracy_fp32']:.4f} -> {gate['accuracy_int8']:.4f}" in err
    assert f"same decision {gate['decision_agreement']:.2%}" in err
    assert "INT8 gate of minmax (float: head), chosen on val, on 64 test images" in err and "FAIL" in err


def test_unknown_precision_is_refused(tmp_path: Path, trained_run: Path) -> None:
    proc = run_export_cli(f"run={trained_run}", "name=breast", f"model_repository={tmp_path / 'repo'}",
                          "quantize=int4", log_dir=tmp_path / "log", check=False)
    assert proc.returncode == 2 and "quantize='int4' is not supported" in proc.stdout + proc.stderr
    assert not (tmp_path / "repo" / "breast").exists()


def run_serve(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "serve", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_int8_served_by_triton_and_local(int8_repo: tuple[Path, str], trained_run: Path, tmp_path: Path) -> None:
    repo = int8_repo[0]
    record = json.loads((trained_run / "run.json").read_text())
    test_images = np.load(record["data"]["source"])["test_images"][:4]
    paths = []
    for i, image in enumerate(test_images):
        Image.fromarray(image).save(tmp_path / f"b{i}.png")
        paths.append(tmp_path / f"b{i}.png")
    version = repo / "breast" / "1"
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = np.stack([load_for_model(p, 28, 1) for p in paths])
    expected = dict(zip(["probabilities", "ood_score", "ood_flag"], session.run(None, {"image": batch}), strict=True))
    for backend in (["--backend", "local"], ["--backend", "http", "--start-server"]):
        proc = run_serve("predict", *map(str, paths), "--model", "breast", "--model-repository", str(repo), "--json",
                         *backend)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        results = json.loads(proc.stdout)
        got = np.array([r["probabilities"] for r in results])
        assert np.abs(got - expected["probabilities"]).max() <= 1e-5, backend
        assert [r["ood_score"] for r in results] == pytest.approx(expected["ood_score"].reshape(-1), abs=1e-3)
        assert [r["ood_flag"] for r in results] == expected["ood_flag"].reshape(-1).tolist()
        assert all(r["version"] == "1" for r in results)
