"""serve.local_backend: the in-process onnxruntime backend, its session options and serialised runs."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from serve.contract import ServeError
from serve.local_backend import LocalBackend, ort_session_options, physical_cores


def test_physical_cores_is_within_the_cpus() -> None:
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)


def test_session_options_pin_threads_and_optimise_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDOPS_ORT_THREADS", raising=False)
    options = ort_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.intra_op_num_threads == physical_cores()
    assert options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert ort_session_options(3).intra_op_num_threads == 3
    monkeypatch.setenv("MEDOPS_ORT_THREADS", "5")
    assert ort_session_options().intra_op_num_threads == 5


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-model repository in the export layout: an ONNX classifier (1 x 8 x 8 -> 2 classes) + metadata.json."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weight = helper.make_tensor("W", TensorProto.FLOAT, [64, 2], rng.normal(size=(64, 2)).astype(np.float32).ravel())
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"]), helper.make_node("MatMul", ["flat", "W"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    version = tmp_path_factory.mktemp("repo") / "tiny" / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(model.SerializeToString())
    meta = {"schema": "medops.model/1", "class_names": ["a", "b"], "max_batch_size": 4,
            "input": {"name": "image", "channels": 1, "size": 8, "window": None}}
    (version / "metadata.json").write_text(json.dumps(meta))
    return version.parent.parent


def test_concurrent_infer_calls_run_one_at_a_time_with_the_same_results(repository: Path) -> None:
    backend = LocalBackend(repository, "tiny")
    batches = [np.random.default_rng(i).random((6, 1, 8, 8), dtype=np.float32) for i in range(8)]
    expected = [backend.infer(b) for b in batches]
    assert expected[0].shape == (6, 2)  # 6 images in chunks of max_batch_size 4

    real_run = backend.session.run
    state = {"active": 0, "max": 0}
    lock = threading.Lock()

    def counting_run(*args, **kwargs):
        with lock:
            state["active"] += 1
            state["max"] = max(state["max"], state["active"])
        time.sleep(0.005)  # long enough for concurrent callers to overlap, were they not serialised
        try:
            return real_run(*args, **kwargs)
        finally:
            with lock:
                state["active"] -= 1

    backend.session.run = counting_run
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(backend.infer, batches))
    assert state["max"] == 1
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)
    backend.close()


@pytest.mark.parametrize(("value", "reason"), [(np.nan, "NaN"), (np.inf, "infinite"), (7.5, "range from")])
def test_values_outside_the_contract_are_refused_with_the_reason(repository: Path, value: float, reason: str) -> None:
    """The local backend refuses what the served model refuses (medops/input_check.py), before running anything."""
    backend = LocalBackend(repository, "tiny")
    batch = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    batch[1, 0, 2, 3] = value
    calls = []
    real_run = backend.session.run
    backend.session.run = lambda *a, **k: calls.append(1) or real_run(*a, **k)
    with pytest.raises(ServeError, match=reason) as err:
        backend.infer(batch)
    assert "[0, 1]" in str(err.value) and calls == []
    assert backend.infer(np.where(np.isfinite(batch), batch, 0).clip(0, 1)).shape == (3, 2)  # the fixed batch runs
    backend.close()
