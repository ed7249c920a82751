"""Every MedMNIST 2D task type through the real CLIs: ordinal grades and multi-label, trained, exported and served.

The data are variants of the embedded BreastMNIST (546/78/156 images, 28 px): an ordinal 3-grade label from the
tertiles of the central patch's mean intensity, and a multi-label set of three labels per image (malignant, brighter
than the training median, top half brighter than the bottom half by more than the training median) in MedMNIST's
N x K format. Tiny runs (small CNN of width 8, a few epochs): the tests check the contract, not the accuracy.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from tests.conftest import BREASTMNIST, FAST, REPO, run_cli, write_medmnist
from train.datamodules import DataError, MedMNISTDataModule
from train.module import ClassificationModule, ordinal_soft_targets

GRADES = ["low", "mid", "high"]
LABELS = ["malignant", "bright", "top_brighter"]


def centre_intensity(images: np.ndarray) -> np.ndarray:
    return images[:, 7:21, 7:21].reshape(len(images), -1).mean(1)


def write_grades(path: Path) -> Path:
    """BreastMNIST with 3 ordered grades: tertiles (on train) of the mean intensity of the central 14 x 14 patch."""
    src = np.load(BREASTMNIST)
    cuts = np.quantile(centre_intensity(src["train_images"]), [1 / 3, 2 / 3])
    return write_medmnist(path, {s: (src[f"{s}_images"], np.digitize(centre_intensity(src[f"{s}_images"]), cuts))
                                 for s in ("train", "val", "test")})


def write_multilabel(path: Path) -> Path:
    """BreastMNIST with labels N x 3 of 0/1 (MedMNIST ChestMNIST format): malignant, bright, top_brighter."""
    src = np.load(BREASTMNIST)

    def features(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        im = images.astype(np.float64)
        return im.reshape(len(im), -1).mean(1), im[:, :14].mean((1, 2)) - im[:, 14:].mean((1, 2))

    medians = [np.median(f) for f in features(src["train_images"])]
    arrays = {}
    for s in ("train", "val", "test"):
        bright, top = features(src[f"{s}_images"])
        malignant = src[f"{s}_labels"].reshape(-1) == 0
        arrays[f"{s}_images"] = src[f"{s}_images"]
        arrays[f"{s}_labels"] = np.stack([malignant, bright > medians[0], top > medians[1]], 1).astype(np.uint8)
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture(scope="module")
def task_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("task_data")
    return {"ordinal": write_grades(folder / "grades.npz"), "multilabel": write_multilabel(folder / "labels3.npz")}


def train(task: str, data: Path, names: list[str], run_dir: Path, *extra: str) -> dict:
    run_cli(*FAST, "data=medmnist", f"data.path={data}", "data.md5=false", f"data.name={data.stem}",
            f"data.class_names=[{','.join(names)}]", "trainer.max_epochs=6", *extra, run_dir=run_dir)
    return json.loads((run_dir / "run.json").read_text())


def export(run_dir: Path, repository: Path, name: str) -> Path:
    cmd = [sys.executable, "-m", "export", f"run={run_dir}", f"name={name}", f"model_repository={repository}",
           "drift.enabled=false"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "-> PASS" in proc.stdout
    return repository / name / "1"


def serve(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250"}
    proc = subprocess.run([sys.executable, "-m", "serve", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def pngs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("task_pngs")
    images = np.load(BREASTMNIST)["test_images"]
    for i in (0, 1):
        Image.fromarray(images[i]).save(folder / f"b{i}.png")
    return [folder / "b0.png", folder / "b1.png"]


def test_sord_soft_targets_are_ordinal() -> None:
    q = ordinal_soft_targets(torch.tensor([0, 2]), 4)
    assert torch.allclose(q.sum(1), torch.ones(2))
    assert q[0, 0] > q[0, 1] > q[0, 2] > q[0, 3] and q[1, 1] == pytest.approx(q[1, 3].item())


def test_task_detection_of_medmnist_files(tmp_path: Path, task_data: dict[str, Path]) -> None:
    dm = MedMNISTDataModule(str(task_data["multilabel"]), md5=False)
    dm.prepare()
    assert dm.task == "multilabel" and dm.class_counts("train") == np.load(task_data["multilabel"])[
        "train_labels"].sum(0).tolist()
    assert dm.summary()["task"] == "multilabel" and dm.positive_class is None and dm.abnormal is None
    retina = tmp_path / "retinamnist.npz"  # the known ordinal MedMNIST set: auto is ordinal
    retina.write_bytes(task_data["ordinal"].read_bytes())
    dm = MedMNISTDataModule(str(retina), md5=False)
    dm.prepare()
    assert dm.task == "ordinal"
    plain = MedMNISTDataModule(str(task_data["ordinal"]), md5=False)
    plain.prepare()
    assert plain.task == "multiclass"  # 3 classes, not declared ordinal
    with pytest.raises(DataError, match="multi-label"):
        MedMNISTDataModule(str(task_data["multilabel"]), md5=False, task="multiclass").prepare()


def test_ordinal_trains_exports_and_serves(tmp_path: Path, task_data: dict[str, Path], pngs: list[Path]) -> None:
    record = train("ordinal", task_data["ordinal"], GRADES, tmp_path / "run", "data.task=ordinal")
    assert record["task"] == "ordinal" and record["data"]["task"] == "ordinal"
    for split in ("val", "test"):
        assert -1.0 <= record[split]["qwk"] <= 1.0 and 0.0 <= record[split]["mae"] <= 2.0
        assert {"acc", "auroc", "f1", "loss"} <= set(record[split])
    assert len(record["confusion_matrix"]) == 3 and "threshold" not in record
    ckpt = torch.load(record["checkpoints"]["best"], map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["task"] == "ordinal"
    version = export(tmp_path / "run", tmp_path / "repo", "grades")
    meta = json.loads((version / "metadata.json").read_text())
    assert meta["input"]["task"] == "ordinal" and meta["metrics"]["test"]["qwk"] == record["test"]["qwk"]
    out = json.loads(serve("predict", "--backend", "local", "--model", "grades", "--model-repository",
                           str(tmp_path / "repo"), "--json", *map(str, pngs)).stdout)
    assert len(out) == 2 and sum(out[0]["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    assert out[0]["top"][0]["class"] in GRADES


def test_multiclass_evaluation_keeps_its_temperature_in_the_export(tmp_path: Path, task_data: dict[str, Path]) -> None:
    """``evaluation.evaluate`` chooses the abnormal threshold on temperature-scaled P(abnormal): the export that takes
    that threshold must apply the same temperature, or every served probability is read against the wrong cut."""
    train("ordinal", task_data["ordinal"], GRADES, tmp_path / "run", "data.task=ordinal", "data.ordinal_cutoff=mid")
    cmd = [sys.executable, "-m", "evaluation.evaluate", f"run={tmp_path / 'run'}", f"output_dir={tmp_path / 'eval'}",
           "n_resamples=20", "wandb=off", f"hydra.run.dir={tmp_path / 'eval_log'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    op = json.loads((tmp_path / "run" / "operating_point.json").read_text())
    assert op["temperature"] > 0 and op["abnormal"]["classes"] == ["mid", "high"]
    version = export(tmp_path / "run", tmp_path / "repo", "grades")
    meta = json.loads((version / "metadata.json").read_text())
    assert meta["operating_point"]["temperature"] == pytest.approx(op["temperature"])
    assert meta["operating_point"]["abnormal"]["value"] == pytest.approx(op["abnormal"]["value"])
    with (tmp_path / "eval" / "predictions_test.csv").open() as fh:
        rows = {int(r["index"]): [float(r[f"p_{g}"]) for g in GRADES] for r in csv.DictReader(fh)}
    evaluated = np.array([rows[i] for i in range(8)])  # the probabilities the threshold was chosen on
    images = np.load(task_data["ordinal"])["test_images"][:8, None].astype(np.float32) / 255.0
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    graph = session.run(["probabilities"], {"image": images})[0]
    assert np.allclose(graph, evaluated, atol=1e-4)
    assert "NOT temperature-scaled" not in (version / "MODEL_CARD.md").read_text()


def test_multilabel_trains_exports_and_serves(tmp_path: Path, task_data: dict[str, Path], pngs: list[Path]) -> None:
    record = train("multilabel", task_data["multilabel"], LABELS, tmp_path / "run")
    assert record["task"] == "multilabel" and record["data"]["task"] == "multilabel"
    labels = record["labels"]
    assert labels["method"] == "youden_j_per_label_on_val" and list(labels["thresholds"]) == LABELS
    per_label_auroc = [labels["test"][name]["auroc"] for name in LABELS]
    assert record["test"]["auroc"] == pytest.approx(np.mean(per_label_auroc))
    assert labels["test"]["bright"]["auroc"] > 0.7  # brightness is learnt within a few epochs
    assert "sigmoid" in record["calibration"]["method"] and "confusion_matrix" not in record
    version = export(tmp_path / "run", tmp_path / "repo", "labels")
    meta = json.loads((version / "metadata.json").read_text())
    assert meta["input"]["task"] == "multilabel" and "sigmoid" in meta["input"]["output"]
    card = (version / "MODEL_CARD.md").read_text()  # the card a reader opens: each label's threshold and figures
    for name in LABELS:
        row = next(line for line in card.splitlines() if line.startswith(f"| {name} | "))
        assert f"| {labels['thresholds'][name]:.4f} |" in row

    # the exported graph gives each label's sigmoid probability (temperature-scaled), not a softmax
    images = np.load(task_data["multilabel"])["test_images"][:32, None].astype(np.float32) / 255.0
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    graph = session.run(["probabilities"], {"image": images})[0]
    module = ClassificationModule.load_from_checkpoint(record["checkpoints"]["best"], map_location="cpu",
                                                       weights_only=False).eval()
    with torch.no_grad():
        logits = module(torch.from_numpy(images)).double().numpy()
    expected = 1 / (1 + np.exp(-logits / record["calibration"]["temperature"]))
    assert graph.shape == (32, 3) and np.allclose(graph, expected, atol=1e-5)
    assert not np.allclose(graph.sum(1), 1.0, atol=1e-3)

    repo = str(tmp_path / "repo")
    out = json.loads(serve("predict", "--backend", "local", "--model", "labels", "--model-repository", repo,
                           "--json", *map(str, pngs)).stdout)
    decision = out[0]["decision"]
    assert [r["label"] for r in decision["per_label"]] == LABELS
    assert decision["labels"] == [r["label"] for r in decision["per_label"] if r["probability"] >= r["threshold"]]
    assert [r["threshold"] for r in decision["per_label"]] == pytest.approx(list(labels["thresholds"].values()))
    table = serve("predict", "--backend", "local", "--model", "labels", "--model-repository", repo, str(pngs[0]))
    assert "threshold" in table.stdout and "top_brighter" in table.stdout
    csv_path = tmp_path / "pred.csv"
    serve("batch", str(task_data["multilabel"]), "--backend", "local", "--model", "labels", "--model-repository",
          repo, "--out", str(csv_path))
    header, first = csv_path.read_text().splitlines()[:2]
    assert [c for c in header.split(",") if c.startswith("prob_")] == [f"prob_{n}" for n in LABELS]
    assert set(first.split(",")[3].split("+")) <= {*LABELS, "(none)"}
