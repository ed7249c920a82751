"""Every answer carries the out-of-distribution score and flag, and a DICOM of another modality gets a warning:
in the exported graph, the local backend, Triton's own KServe v2 JSON endpoint, ``serve predict`` and the
``serve batch`` CSV."""

from __future__ import annotations

import csv
import json
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from medops.io import to_unit_range
from medops.model_version import OOD_FLAG_OUTPUT, OOD_SCORE_OUTPUT, OUTPUT_NAME
from medops.triton_config import parse_model_config
from serve.client import open_backend
from tests.conftest import BREASTMNIST, REPO
from tests.serve.test_predict import run_serve

pytestmark = pytest.mark.slow

CT = REPO / "tests" / "data" / "CT_small.dcm"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """BreastMNIST test PNGs, and two images no breast-ultrasound model has seen: noise and a checkerboard."""
    folder = tmp_path_factory.mktemp("ood_inputs")
    for i, image in enumerate(np.load(BREASTMNIST)["test_images"][:8]):
        Image.fromarray(image).save(folder / f"breast{i}.png")
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "noise.png")
    Image.fromarray((np.indices((28, 28)).sum(0) % 2 * 255).astype(np.uint8)).save(folder / "checkerboard.png")
    return {p.stem: p for p in sorted(folder.glob("*.png"))}


def version_dir(repository: Path) -> Path:
    return repository / "breast" / "1"


def test_export_fits_the_score_and_puts_it_in_the_graph(exported_repo: Path) -> None:
    folder = version_dir(exported_repo)
    meta = json.loads((folder / "metadata.json").read_text())
    ood = meta["ood"]
    assert ood["method"] == "mahalanobis" and ood["fit_split"] == "train" and ood["threshold_split"] == "val"
    assert ood["fitted_on"] == 192 and ood["threshold_on"] == 78  # the fixture's train and val splits
    assert 1 - ood["val_flagged"] >= ood["pass_rate"]
    assert ood["graph_max_abs_diff"] < 1e-3
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == [OUTPUT_NAME, OOD_SCORE_OUTPUT, OOD_FLAG_OUTPUT]
    data = np.load(BREASTMNIST)
    val = to_unit_range(data["val_images"][:, None])
    _, score, flag = session.run(None, {"image": val})
    assert score.shape == (78, 1) and flag.dtype == np.bool_
    np.testing.assert_array_equal(flag, score > ood["threshold"])  # the flag is the score against the threshold
    config = parse_model_config((exported_repo / "breast" / "config.pbtxt").read_text())
    assert [o.name for o in config.output] == [OUTPUT_NAME, OOD_SCORE_OUTPUT, OOD_FLAG_OUTPUT]
    assert float(config.parameters["ood_threshold"].string_value) == pytest.approx(ood["threshold"], rel=1e-5)
    assert json.loads(config.parameters["modalities"].string_value) == ["US"]  # BreastMNIST is ultrasound


def test_local_backend_flags_images_unlike_the_training_data(exported_repo: Path, inputs: dict[str, Path]) -> None:
    backend = open_backend("local", model="breast", model_repository=exported_repo)
    from serve.predict import predict_files

    results = {Path(r["path"]).stem: r for r in predict_files(list(inputs.values()), backend)}
    assert results["noise"]["ood_flag"] and results["checkerboard"]["ood_flag"]
    assert results["noise"]["ood_score"] > backend.info.extra["ood_threshold"]
    assert any("out of distribution" in w for w in results["noise"]["warnings"])
    breast = [results[f"breast{i}"] for i in range(8)]
    assert sum(r["ood_flag"] for r in breast) <= 2  # held-out images like the training data mostly pass
    assert all("warnings" not in r for r in breast if not r["ood_flag"])


def kserve_json(url: str, batch: np.ndarray) -> dict:
    """A request through Triton's standard KServe v2 JSON endpoint, no project or Triton client."""
    body = {"inputs": [{"name": "image", "shape": list(batch.shape), "datatype": "FP32",
                        "data": batch.reshape(-1).tolist()}]}
    request = urllib.request.Request(f"http://{url}/v2/models/breast/infer", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_triton_response_has_the_score_and_flag(served) -> None:
    breast = to_unit_range(np.load(BREASTMNIST)["test_images"][:2, None])
    noise = np.random.default_rng(1).random((1, 1, 28, 28), dtype=np.float32)
    reply = kserve_json(served.server.http_url, np.concatenate([breast, noise]))
    outputs = {o["name"]: o for o in reply["outputs"]}
    assert set(outputs) == {OUTPUT_NAME, OOD_SCORE_OUTPUT, OOD_FLAG_OUTPUT}
    assert outputs[OOD_FLAG_OUTPUT]["datatype"] == "BOOL" and outputs[OOD_SCORE_OUTPUT]["shape"] == [3, 1]
    assert outputs[OOD_FLAG_OUTPUT]["data"][2] is True  # noise
    local = open_backend("local", model="breast", model_repository=served.repository)
    expected = local.infer_outputs(np.concatenate([breast, noise]))
    np.testing.assert_allclose(outputs[OOD_SCORE_OUTPUT]["data"], expected[OOD_SCORE_OUTPUT].reshape(-1), rtol=1e-4)


def test_cli_predict_warns_about_another_modality_and_ood(served, inputs: dict[str, Path]) -> None:
    proc = run_serve("predict", str(CT), str(inputs["noise"]), str(inputs["breast0"]), "--model", "breast",
                     "--url", served.server.grpc_url, "--backend", "grpc", "--json")
    assert proc.returncode == 0, proc.stderr
    results = {Path(r["path"]).name: r for r in json.loads(proc.stdout)}
    ct = results["CT_small.dcm"]
    assert any("Modality CT differs from the training data's (US)" in w for w in ct["warnings"])
    assert isinstance(ct["ood_score"], float) and isinstance(ct["ood_flag"], bool)
    assert results["noise.png"]["ood_flag"] is True
    assert not any("Modality" in w for w in results["breast0.png"].get("warnings", []))  # PNG: no DICOM header
    table = run_serve("predict", str(CT), str(inputs["noise"]), "--model", "breast", "--url", served.server.http_url)
    assert table.returncode == 0, table.stderr
    assert "OOD score" in table.stdout and "OOD" in table.stdout.split("OOD score", 1)[1]
    assert "warning" in table.stderr and "Modality CT" in table.stderr


def test_batch_csv_has_score_flag_and_warning(served, inputs: dict[str, Path], tmp_path: Path) -> None:
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join(str(p) for p in [*inputs.values(), CT]) + "\n")
    out = tmp_path / "pred.csv"
    proc = run_serve("batch", str(listing), "--model", "breast", "--url", served.server.http_url, "--out", str(out),
                     "--no-resume", timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    assert rows["noise.png"]["ood_flag"] == "1" and float(rows["noise.png"]["ood_score"]) > 0
    assert "out of distribution" in rows["noise.png"]["warning"]
    assert "Modality CT" in rows["CT_small.dcm"]["warning"]
    assert all(rows[f"breast{i}.png"]["ood_flag"] in ("0", "1") for i in range(8))
    assert "out-of-distribution (ood_flag)" in proc.stdout
