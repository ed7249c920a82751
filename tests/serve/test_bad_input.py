"""Bad requests and bad files against a real Triton: refused with a reason, and the server keeps serving."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from rich.console import Console
from tritonclient.utils import InferenceServerException

from serve.client import open_backend
from serve.predict import predict_files, render_errors
from tests.conftest import BREASTMNIST, REPO

pytestmark = pytest.mark.slow

CT = REPO / "tests" / "data" / "CT_small.dcm"
MODEL = "breast"


def good_batch(n: int = 2) -> np.ndarray:
    images = np.load(BREASTMNIST)["test_images"][:n]
    return (images[:, None].astype(np.float32) / np.float32(255.0)).copy()


def infer(client, mod, array: np.ndarray, datatype: str = "FP32"):
    inp = mod.InferInput("image", list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    return client.infer(MODEL, [inp], outputs=[mod.InferRequestedOutput("probabilities")])


BAD_REQUESTS = {
    # name: (array, datatype, words expected in the reason)
    "wrong_shape": (np.zeros((2, 1, 27, 27), np.float32), "FP32", ("shape", "27")),
    "wrong_rank": (np.zeros((2, 28, 28), np.float32), "FP32", ("shape",)),
    "fp64": (np.zeros((2, 1, 28, 28), np.float64), "FP64", ("FP64", "FP32")),
    "batch_too_large": (np.zeros((65, 1, 28, 28), np.float32), "FP32", ("batch", "64")),
    # the value contract (medops/input_check.py, run by the served model): finite values in [0, 1]
    "nan": (np.where(np.eye(28, dtype=bool), np.float32(np.nan), good_batch(2)).astype(np.float32), "FP32",
            ("56 NaN", "finite", "[0, 1]")),
    "inf": (np.full((1, 1, 28, 28), np.inf, np.float32), "FP32", ("784 infinite",)),
    "out_of_range": (good_batch(2) * np.float32(1e9), "FP32", ("range from", "[0, 1]")),
    "uint8_scale": (good_batch(2) * np.float32(255), "FP32", ("range from", "uint8 intensity / 255")),
}


@pytest.fixture(params=["http", "grpc"])
def client(request, served):
    if request.param == "http":
        c = httpclient.InferenceServerClient(served.server.http_url)
        mod = httpclient
    else:
        c = grpcclient.InferenceServerClient(served.server.grpc_url)
        mod = grpcclient
    try:
        yield request.param, c, mod
    finally:
        c.close()  # an open HTTP keep-alive connection would delay Triton's shutdown


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_refused_and_server_keeps_serving(client, case: str) -> None:
    protocol, c, mod = client
    array, datatype, words = BAD_REQUESTS[case]
    with pytest.raises(InferenceServerException) as info:
        infer(c, mod, array, datatype)
    reason = info.value.message() or str(info.value)
    assert reason, "no reason given"
    for word in words:
        assert word.lower() in reason.lower(), reason
    if protocol == "http":
        status = info.value.status()
        assert status is not None and 400 <= int(status) < 500, (status, reason)
    else:
        assert "INVALID_ARGUMENT" in str(info.value.status()), (info.value.status(), reason)

    assert c.is_server_ready() and c.is_model_ready(MODEL)
    batch = good_batch(3)
    probs = infer(c, mod, batch).as_numpy("probabilities")
    assert probs.shape == (3, 2)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_unreadable_files_get_their_own_error(served, tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is a text file, not an image\n")
    ds = pydicom.dcmread(CT)
    del ds.PixelData
    no_pixels = tmp_path / "no_pixels.dcm"
    ds.save_as(no_pixels)
    missing = tmp_path / "missing.png"
    good = tmp_path / "good.npy"
    np.save(good, np.load(BREASTMNIST)["test_images"][0])

    paths = [empty, good, text, no_pixels, missing, CT]
    backend = open_backend("http", url=served.server.http_url, model=MODEL)
    try:
        results = predict_files(paths, backend, top_k=2)
    finally:
        backend.close()

    assert [r["path"] for r in results] == [str(p) for p in paths]
    bad = {r["path"]: r["error"] for r in results if "error" in r}
    assert set(bad) == {str(empty), str(text), str(no_pixels), str(missing)}
    assert all(isinstance(reason, str) and reason for reason in bad.values())
    assert "pixel" in bad[str(no_pixels)].lower()
    for r in (results[1], results[5]):
        assert "error" not in r and len(r["top"]) == 2 and abs(sum(r["probabilities"]) - 1) < 1e-5

    buffer = io.StringIO()
    render_errors(results, Console(file=buffer, width=300))
    lines = buffer.getvalue().splitlines()
    assert len([line for line in lines if line.startswith("error: ")]) == 4
    assert [line for line in lines if line.startswith("warning: ")] == [  # the CT slice to an ultrasound model
        f"warning: {CT}: DICOM Modality CT differs from the training data's (US): the model was not trained on such "
        "images"]
    for path in bad:
        assert any(line.startswith(f"error: {path}: ") for line in lines), (path, lines)
