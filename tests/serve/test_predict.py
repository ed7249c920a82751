"""``serve.predict`` and ``python -m serve predict`` against a real Triton (HTTP, gRPC) and onnxruntime (local)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pydicom
import pytest
from PIL import Image
from rich.console import Console

from medops import load_for_model
from serve.client import open_backend
from serve.contract import ModelInfo
from serve.predict import predict_files, prediction_result, render_table, top_k_classes
from serve.triton_server import free_port
from tests.conftest import BREASTMNIST, REPO

CT = REPO / "tests" / "data" / "CT_small.dcm"


def run_serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m serve ...`` in a subprocess; a wide terminal so that rich does not fold paths."""
    env = {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "serve", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A PNG and a .npy of BreastMNIST test images, and the CT DICOM (a different size: it gets resized)."""
    folder = tmp_path_factory.mktemp("predict_inputs")
    test_images = np.load(BREASTMNIST)["test_images"]
    Image.fromarray(test_images[0]).save(folder / "breast0.png")
    np.save(folder / "breast1.npy", test_images[1])
    return {"png": folder / "breast0.png", "npy": folder / "breast1.npy", "dcm": CT}


def reference(repository: Path, paths: list[Path]) -> tuple[np.ndarray, list[str]]:
    """Probabilities of plain onnxruntime on the exported model.onnx, inputs read with the metadata's contract."""
    version = repository / "breast" / "1"
    meta = json.loads((version / "metadata.json").read_text())
    contract = meta["input"]
    batch = np.stack([load_for_model(p, contract["size"], contract["channels"]) for p in paths])
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {contract["name"]: batch})[0], meta["class_names"]


def test_top_k_classes_orders_and_clamps() -> None:
    probs = np.array([0.1, 0.5, 0.15, 0.25], np.float32)
    names = ["a", "b", "c", "d"]
    assert [t["class"] for t in top_k_classes(probs, names, 3)] == ["b", "d", "c"]
    assert top_k_classes(probs, names, 1) == [{"class": "b", "probability": pytest.approx(0.5)}]
    assert len(top_k_classes(probs, names, 10)) == 4
    assert [t["class"] for t in top_k_classes(np.array([0.5, 0.5]), ["x", "y"], 2)] == ["x", "y"]  # stable ties


def file_cells(text: str, name: str) -> list[str]:
    """The cells of a rendered table's first row for the file whose path ends with ``name``."""
    line = next(line for line in text.splitlines() if f"{name} " in line)
    return [c.strip() for c in line.split("│")[1:-1]]


def breast_info(**extra: object) -> ModelInfo:
    return ModelInfo(name="breastmnist", version="10", input_name="image", output_name="probabilities", channels=1,
                     size=28, max_batch_size=8, class_names=["malignant", "normal_or_benign"], extra=dict(extra))


@pytest.mark.parametrize("with_op", [True, False], ids=["operating-point", "argmax"])
def test_table_shows_the_decision_and_its_rule(with_op: bool) -> None:
    info = breast_info(threshold=0.2016, positive_class="malignant") if with_op else breast_info()
    outputs = {"probabilities": np.array([[0.401, 0.599]], np.float32)}
    result = prediction_result("scan.png", outputs, info, latency_ms=3.0, top_k=2)
    console = Console(width=250, record=True, file=io.StringIO())
    console.print(render_table([result], info))
    text = console.export_text()
    cells = file_cells(text, "scan.png")
    if with_op:  # P(malignant) 0.401 >= 0.2016: malignant, though the arg-max is normal_or_benign
        assert result["decision"] == {"class": "malignant", "threshold": 0.2016, "positive_class": "malignant",
                                      "rule": "P(malignant) >= 0.2016"}
        assert cells[:5] == ["scan.png", "malignant", "1", "normal_or_benign", "0.5990"]
        assert "decision at P(malignant) >= 0.2016 (the version's operating point" in text
    else:
        assert result["decision"] == {"class": "normal_or_benign", "rule": "arg-max class (no operating point)"}
        assert cells[:2] == ["scan.png", "normal_or_benign"]
        assert "decision: the arg-max class (breastmnist v10 has no operating point)" in text


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["http", "grpc", "local"])
def test_predict_files_match_onnxruntime(served, images: dict[str, Path], kind: str) -> None:
    paths = [images["png"], images["dcm"], images["npy"]]
    expected, class_names = reference(served.repository, paths)
    url = served.server.grpc_url if kind == "grpc" else served.server.http_url
    backend = open_backend(kind, url=url, model=served.model, model_repository=served.repository)
    try:
        assert backend.info.class_names == class_names
        results = predict_files(paths, backend, top_k=3)
    finally:
        backend.close()

    assert [r["path"] for r in results] == [str(p) for p in paths]
    got = np.array([r["probabilities"] for r in results])
    assert got.shape == expected.shape == (3, 2)
    assert np.max(np.abs(got - expected)) <= 1e-5
    for result, probs in zip(results, expected, strict=True):
        assert "error" not in result
        assert result["model"] == "breast" and result["version"] == "1"
        assert result["latency_ms"] > 0
        top = result["top"]
        assert len(top) == 2  # top-3 of a 2-class model
        assert [t["class"] for t in top] == [class_names[i] for i in np.argsort(-probs, kind="stable")]
        assert top[0]["probability"] >= top[1]["probability"]
        assert top[0]["probability"] == pytest.approx(float(probs.max()), abs=1e-5)


@pytest.mark.slow
def test_cli_json_output(served, images: dict[str, Path]) -> None:
    paths = [images["png"], images["dcm"], images["npy"]]
    expected, class_names = reference(served.repository, paths)
    proc = run_serve("predict", *map(str, paths), "--model", "breast", "--url", served.server.http_url,
                     "--top-k", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert [r["path"] for r in results] == [str(p) for p in paths]
    for result, probs in zip(results, expected, strict=True):
        assert {"path", "top", "model", "version", "latency_ms"} <= set(result)
        assert result["model"] == "breast" and result["version"] == "1"
        assert isinstance(result["latency_ms"], float) and result["latency_ms"] > 0
        assert len(result["top"]) == 1
        assert result["top"][0]["class"] == class_names[int(np.argmax(probs))]
        assert abs(result["top"][0]["probability"] - float(probs.max())) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("as_json", [True, False], ids=["json", "table"])
def test_cli_corrupt_file_is_reported_and_others_predicted(served, images: dict[str, Path], tmp_path: Path,
                                                           as_json: bool) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))  # a PNG signature, then garbage
    args = ["predict", str(images["png"]), str(corrupt), str(images["npy"]), "--model", "breast",
            "--url", served.server.grpc_url, "--backend", "grpc"]
    proc = run_serve(*args, *(["--json"] if as_json else []))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    if as_json:
        results = json.loads(proc.stdout)
        assert [r["path"] for r in results] == [str(images["png"]), str(corrupt), str(images["npy"])]
        assert set(results[1]) == {"path", "error"} and results[1]["error"]
        assert all(len(r["top"]) == 2 for r in (results[0], results[2]))
    else:
        assert f"error: {corrupt}:" in proc.stderr
        assert str(images["png"]) in proc.stdout and str(images["npy"]) in proc.stdout
        assert "normal_or_benign" in proc.stdout and "malignant" in proc.stdout


@pytest.mark.slow
def test_cli_table_decision_is_the_json_decision(served, images: dict[str, Path]) -> None:
    """The table's decision column is the operating-point decision ``--json`` gives, with the rule stated."""
    paths = [str(images["png"]), str(images["npy"]), str(images["dcm"])]
    common = ["predict", *paths, "--model", "breast", "--url", served.server.http_url]
    as_json = run_serve(*common, "--json")
    table = run_serve(*common)
    assert as_json.returncode == table.returncode == 0, as_json.stderr + table.stderr
    op = json.loads((served.repository / "breast" / "1" / "metadata.json").read_text())["operating_point"]
    for result in json.loads(as_json.stdout):
        decision = result["decision"]
        assert decision["threshold"] == pytest.approx(op["threshold"], abs=1e-6)
        probs = dict(zip(["malignant", "normal_or_benign"], result["probabilities"], strict=True))
        expected = op["positive_class"] if probs[op["positive_class"]] >= op["threshold"] else \
            next(c for c in probs if c != op["positive_class"])
        assert decision["class"] == expected
        assert file_cells(table.stdout, Path(result["path"]).name)[1] == expected
    assert f"decision at P({op['positive_class']}) >= {op['threshold']:.4f}" in table.stdout


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_cli_server_down_exits_2_quickly(images: dict[str, Path], kind: str) -> None:
    url = f"127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    proc = run_serve("predict", str(images["png"]), "--model", "breast", "--backend", kind, "--url", url,
                     "--retries", "1", timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert elapsed < 20, f"took {elapsed:.1f} s"
    assert url in proc.stderr and "breast" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip() == ""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["http", "grpc", "local"])
def test_cli_unknown_model_exits_2(served, images: dict[str, Path], kind: str) -> None:
    url = served.server.grpc_url if kind == "grpc" else served.server.http_url
    proc = run_serve("predict", str(images["png"]), "--model", "no_such_model", "--backend", kind, "--url", url,
                     "--model-repository", str(served.repository), "--retries", "0")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no_such_model" in proc.stderr
    assert (str(served.repository) if kind == "local" else url) in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_output_has_no_patient_data(served, images: dict[str, Path], tmp_path: Path) -> None:
    ds = pydicom.dcmread(CT)
    secrets = [str(ds.PatientName), str(ds.PatientID)]
    assert all(len(s) >= 3 for s in secrets), secrets  # meaningful strings to search for
    secrets.append(secrets[0].replace("^", " "))  # the name as pydicom may render it
    del ds.PixelData
    no_pixels = tmp_path / "no_pixels.dcm"
    ds.save_as(no_pixels)

    outputs = []
    for extra in ([], ["--json"]):
        proc = run_serve("predict", str(CT), str(no_pixels), "--model", "breast", "--url", served.server.http_url,
                         *extra)
        assert proc.returncode == 1, proc.stdout + proc.stderr  # the pixel-less copy fails, the CT is predicted
        assert str(no_pixels) in proc.stdout + proc.stderr
        outputs.append(proc.stdout + proc.stderr)
    for text in outputs:
        for secret in secrets:
            assert secret not in text


def test_cli_imports_no_torch() -> None:
    code = ("import sys, serve.__main__, serve.predict, serve.client, serve.contract, serve.local_backend; "
            "from serve.__main__ import build_parser; build_parser().parse_args(['predict', 'x.png', '--model', 'm']); "
            "bad = [m for m in ('torch', 'lightning', 'torchvision') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
