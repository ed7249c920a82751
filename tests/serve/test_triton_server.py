"""A real Triton server (the binary bundled in nvidia-pytriton) serving a tiny ONNX classifier via the Python backend.

No torch: the classifier is built with onnx.helper. The module-scoped server is started once (~2 s).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import stat
import sys
import time
import types
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import json_format
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

import medops.input_check as input_check
import medops.integrity as integrity
from medops.triton_config import build_model_config, render_model_config
from serve.triton_server import (
    TritonNotFound,
    TritonServer,
    find_tritonserver,
    free_port,
    prepare_bundled_backends,
    server_env,
)

TEMPLATE = Path(__file__).resolve().parents[2] / "export" / "templates" / "model.py"
LABELS = ["benign", "malignant", "normal"]
BATCH = np.random.default_rng(1).random(size=(5, 1, 4, 4)).astype(np.float32)  # the [0, 1] contract


def tiny_onnx(path: Path) -> Path:
    """image float32 [N,1,4,4] -> Flatten -> Gemm(16->3) -> Softmax -> probabilities [N,3], opset 17."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(16, 3)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["image"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "W", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime we support
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def write_model(repo: Path, name: str = "tiny", model_py: str | None = None) -> Path:
    folder = repo / name
    (folder / "1").mkdir(parents=True)
    config = build_model_config(name, "python", channels=1, image_size=4, num_classes=3, max_batch_size=8)
    (folder / "config.pbtxt").write_text(render_model_config(config))
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    tiny_onnx(folder / "1" / "model.onnx")
    if model_py is None:
        shutil.copy(TEMPLATE, folder / "1" / "model.py")
        shutil.copy(input_check.__file__, folder / "1" / "input_check.py")  # as export writes it
        shutil.copy(integrity.__file__, folder / "1" / "integrity.py")
        meta = integrity.seal(folder / "1", {"name": name, "version": 1})  # the file digests export records
        (folder / "1" / "metadata.json").write_text(json.dumps(meta))
    else:
        (folder / "1" / "model.py").write_text(model_py)
    return folder


def reference(batch: np.ndarray, onnx_path: Path) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"image": batch})[0]


def distinct_ports(n: int = 3) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore client-side TIME_WAIT leftovers
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("triton") / "repo"
    write_model(root)
    return root


@pytest.fixture(scope="module")
def server(repo: Path):
    http, grpc, metrics = distinct_ports()
    srv = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics)
    srv.start(timeout=60)
    yield srv
    # 0, not -9: Triton waits (up to --exit-timeout-secs=30) for open HTTP keep-alive connections, so a test that
    # leaks an HTTP client turns this graceful stop into a SIGKILL after the grace period.
    assert srv.stop() == 0


# ---------------------------------------------------------------- no server needed


def test_missing_binary_raises_triton_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "tritonserver"
    with pytest.raises(TritonNotFound, match=r"tritonserver binary .*nowhere/tritonserver does not exist"):
        find_tritonserver(missing)
    not_exec = tmp_path / "tritonserver"
    not_exec.write_text("#!/bin/sh\n")
    with pytest.raises(TritonNotFound, match="is not executable"):
        find_tritonserver(not_exec)
    (tmp_path / "repo").mkdir()
    srv = TritonServer(tmp_path / "repo", tritonserver=missing)
    with pytest.raises(TritonNotFound, match="does not exist"):
        srv.start(timeout=5)
    assert srv.process is None


def test_server_env_puts_this_python_first_and_bundled_libs_on_ld_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/existing/lib")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    env = server_env(find_tritonserver())
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert env["PATH"].endswith("/usr/bin:/bin")
    ld = env["LD_LIBRARY_PATH"].split(":")
    assert ld[0] == "/opt/existing/lib"
    assert any(p.endswith("nvidia_pytriton.libs") and Path(p).is_dir() for p in ld)


def test_prepare_bundled_backends_is_idempotent(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "tritonserver"
    backends = prepare_bundled_backends(cache)
    stub = backends / "python" / "triton_python_backend_stub"
    assert backends == cache / "backends"
    assert stub.is_file() and stub.stat().st_mode & stat.S_IXUSR
    assert (backends / "python" / "libtriton_python.so").is_file()
    assert not (cache / "python_backend_stubs").exists()
    mtime = stub.stat().st_mtime_ns
    assert prepare_bundled_backends(cache) == backends
    assert stub.stat().st_mtime_ns == mtime  # not rebuilt
    assert [p.name for p in cache.parent.iterdir()] == ["tritonserver"]  # no temporary folders left behind


def test_prepare_bundled_backends_survives_a_race(tmp_path: Path) -> None:
    cache = tmp_path / "tritonserver"
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda _: prepare_bundled_backends(cache), range(3)))
    assert results == [cache / "backends"] * 3
    assert (cache / "backends" / "python" / "triton_python_backend_stub").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["tritonserver"]


def test_server_arguments_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model_control"):
        TritonServer(tmp_path, model_control="poll")
    with pytest.raises(ValueError, match="explicit"):
        TritonServer(tmp_path, load_models=["tiny"])
    with pytest.raises(ValueError, match="ports must differ"):
        TritonServer(tmp_path, http_port=9000, grpc_port=9000, metrics_port=9002)


class _FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class _FakeResponse:
    def __init__(self, output_tensors, error=None) -> None:
        self.output_tensors, self.error = output_tensors, error


class _FakeError:
    INVALID_ARG = "INVALID_ARG"

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        self.message, self.code = message, code


class _FakeRequest(dict):
    """A request: its input tensors by name and the outputs its client asked for (none: all)."""

    def __init__(self, tensors: dict, requested: tuple[str, ...] = ()) -> None:
        super().__init__(tensors)
        self.requested = requested

    def requested_output_names(self) -> list[str]:
        return list(self.requested)


def _fake_pb_utils(log: list[str]) -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = _FakeTensor
    module.InferenceResponse = _FakeResponse
    module.TritonError = _FakeError
    module.TritonModelException = RuntimeError
    module.Logger = types.SimpleNamespace(log_info=log.append, log_warn=log.append, log_error=log.append)
    module.get_input_tensor_by_name = lambda request, name: request.get(name)
    return module


def test_template_batches_valid_requests_and_rejects_bad_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The template's execute() with a stand-in pb_utils: Triton itself rejects bad shapes before the model,
    so this is the only place the model's own per-request validation and batching are observable."""
    log: list[str] = []
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils(log))
    spec = importlib.util.spec_from_file_location("medops_template_model", TEMPLATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "torch" not in module.__dict__

    folder = write_model(tmp_path / "repo")
    config = build_model_config("tiny", "python", channels=1, image_size=4, num_classes=3)

    model = module.TritonPythonModel()
    model.initialize(
        {
            "model_config": json_format.MessageToJson(config),
            "model_repository": str(folder),
            "model_version": "1",
            "model_name": "tiny",
        }
    )
    assert any("providers in use: CPUExecutionProvider" in line for line in log)
    assert "tiny v1: files verified against metadata.json" in log
    calls = []
    real_run = model.session.run
    model.session = types.SimpleNamespace(run=lambda *a: calls.append(a[1]["image"].shape) or real_run(*a))

    requests = [_FakeRequest(r) for r in (
        {"image": _FakeTensor("image", BATCH[:2])},
        {"image": _FakeTensor("image", np.zeros((2, 1, 5, 5), np.float32))},
        {"image": _FakeTensor("image", BATCH[:1].astype(np.float64))},
        {},
        {"image": _FakeTensor("image", BATCH[0])},
        {"image": _FakeTensor("image", BATCH[2:])},
        {"image": _FakeTensor("image", np.where(np.eye(4, dtype=bool), np.nan, BATCH[:1]).astype(np.float32))},
        {"image": _FakeTensor("image", BATCH[:1] * 1e9)},
        {"image": _FakeTensor("image", np.full((1, 1, 4, 4), np.inf, np.float32))},
    )]
    responses = model.execute(requests)
    assert len(responses) == len(requests)
    assert calls == [(5, 1, 4, 4)]  # the two valid requests ran as one batch
    expected = reference(BATCH, folder / "1" / "model.onnx")
    ok0, ok5 = responses[0], responses[5]
    assert ok0.error is None and ok5.error is None
    np.testing.assert_allclose(ok0.output_tensors[0].as_numpy(), expected[:2], atol=1e-6)
    np.testing.assert_allclose(ok5.output_tensors[0].as_numpy(), expected[2:], atol=1e-6)
    assert ok0.output_tensors[0].name() == "probabilities"
    assert ok0.output_tensors[0].as_numpy().dtype == np.float32
    errors = {i: responses[i].error.message for i in (1, 2, 3, 4, 6, 7, 8)}
    assert all(responses[i].output_tensors == [] for i in errors)
    assert all(responses[i].error.code == "INVALID_ARG" for i in errors)  # 400, not 500
    assert "[2, 1, 5, 5]" in errors[1] and "[N, 1, 4, 4]" in errors[1]
    assert "FP32" in errors[2] and "float64" in errors[2]
    assert "missing input 'image'" in errors[3]
    assert "4 dims" in errors[4] and "[1, 4, 4]" in errors[4]
    assert "4 NaN" in errors[6] and "[0, 1]" in errors[6]  # refused with the reason, nothing computed
    assert "range from" in errors[7] and "[0, 1]" in errors[7]
    assert "16 infinite" in errors[8]

    # all valid: one value check for the batch, one run, each client its own rows of the outputs it asked for
    calls.clear()
    valid = model.execute([_FakeRequest({"image": _FakeTensor("image", BATCH[k:k + 1])}, requested)
                           for k, requested in enumerate([(), ("probabilities",), ()])])
    assert calls == [(3, 1, 4, 4)]
    for k, response in enumerate(valid):
        assert response.error is None and [t.name() for t in response.output_tensors] == ["probabilities"]
        np.testing.assert_allclose(response.output_tensors[0].as_numpy(), expected[k:k + 1], atol=1e-6)
    # every input refused: nothing runs
    calls.clear()
    refused = model.execute([_FakeRequest({"image": _FakeTensor("image", BATCH[:1] * 1e9)})])
    assert calls == [] and "range from" in refused[0].error.message
    model.finalize()
    assert model.session is None


def test_template_sets_a_gauge_only_when_its_value_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each gauge set is a round trip to the Triton process; a value the gauge already holds is not sent again,
    and every new value (NaN included, which never equals itself) is."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils([]))
    spec = importlib.util.spec_from_file_location("medops_template_model_set", TEMPLATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.monitor = {"published": {}}
    window, alarm = types.SimpleNamespace(sent=[]), types.SimpleNamespace(sent=[])
    window.set, alarm.set = window.sent.append, alarm.sent.append
    for value in (256, 256, 200, 256, 256):
        model._set(window, value)
    for value in (0.0, 0.0, 1.0, 1.0, float("nan"), float("nan"), 0.0):
        model._set(alarm, value)
    assert window.sent == [256, 200, 256]
    assert alarm.sent[:2] == [0.0, 1.0] and np.isnan(alarm.sent[2:4]).all() and alarm.sent[4:] == [0.0]


class _FakeMetricFamily:
    """pb_utils.MetricFamily's shape: families by name, each metric recording what was sent to Triton."""

    COUNTER, GAUGE = "counter", "gauge"
    made: dict[str, _FakeMetricFamily] = {}

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name, self.kind, self.metrics = name, kind, []
        _FakeMetricFamily.made[name] = self

    def Metric(self, labels: dict[str, str]) -> types.SimpleNamespace:  # noqa: N802 (Triton's name)
        metric = types.SimpleNamespace(labels=labels, sent=[])
        metric.increment = metric.sent.append
        self.metrics.append(metric)
        return metric


def _tiny_template_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, metric_family: type) -> tuple[Any, list[str]]:
    """The template's model, initialised on a tiny export with a stand-in pb_utils whose MetricFamily is
    ``metric_family``; returns it and the log lines it wrote."""
    log: list[str] = []
    fake = _fake_pb_utils(log)
    fake.MetricFamily = metric_family
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    spec = importlib.util.spec_from_file_location(f"medops_template_model_{metric_family.__name__}", TEMPLATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = write_model(tmp_path / "repo")
    config = build_model_config("tiny", "python", channels=1, image_size=4, num_classes=3)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json_format.MessageToJson(config), "model_repository": str(folder),
                      "model_version": "1", "model_name": "tiny"})
    return model, log


def test_template_counts_its_cpu_time_in_execute_and_in_onnxruntime(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Counters of the stub's CPU time in execute() and in onnxruntime, with the images they cover: sent once 32
    requests or images are pending (each send is a round trip to Triton), the rest at finalize; nothing is lost or
    counted twice, and onnxruntime's share never exceeds execute()'s."""
    _FakeMetricFamily.made = {}
    model, log = _tiny_template_model(tmp_path, monkeypatch, _FakeMetricFamily)
    families = _FakeMetricFamily.made
    names = {"medops_execute_cpu_seconds_total", "medops_onnxruntime_cpu_seconds_total", "medops_execute_images_total"}
    assert names <= set(families) and all(families[n].kind == "counter" for n in names)
    execute, ort, images = (families[f"medops_{n}"].metrics[0] for n in (
        "execute_cpu_seconds_total", "onnxruntime_cpu_seconds_total", "execute_images_total"))
    assert execute.labels == {"model": "tiny", "version": "1", "stub": str(os.getpid())}

    def one_image_requests(count: int) -> None:
        for k in range(count):
            response = model.execute([_FakeRequest({"image": _FakeTensor("image", BATCH[k % 5:k % 5 + 1])})])[0]
            assert response.error is None, response.error.message

    one_image_requests(31)
    assert execute.sent == [] and images.sent == []  # nothing sent before 32 requests are pending
    one_image_requests(1)
    assert images.sent == [32] and len(execute.sent) == len(ort.sent) == 1
    assert 0 < ort.sent[0] <= execute.sent[0]
    one_image_requests(5)
    model.execute([_FakeRequest({"image": _FakeTensor("image", BATCH[:4])}),  # one run of 4 + 1 images
                   _FakeRequest({"image": _FakeTensor("image", BATCH[4:])})])
    refused = model.execute([_FakeRequest({"image": _FakeTensor("image", BATCH[:1] * 1e9)})])
    assert refused[0].error is not None  # no image ran: its time is not counted against the others
    assert model.cost["pending"]["images"] == 10 and model.cost["requests"] == 7

    # a send that fails loses its share (logged), and never sends it twice: what was pending is cleared first
    sent = ort.increment
    ort.increment = lambda value: (_ for _ in ()).throw(RuntimeError("gone"))
    one_image_requests(22)  # 10 + 22 = 32 images pending: a send, which fails after execute's
    assert len(execute.sent) == 2 and len(ort.sent) == 1 and images.sent == [32]
    assert model.cost["pending"]["images"] == 0 and model.cost["requests"] == 0
    assert any("CPU-time counters failed: gone" in line for line in log)
    ort.increment = sent
    one_image_requests(3)
    model.finalize()  # what is pending at the end is sent, not lost
    assert images.sent == [32, 3] and len(execute.sent) == 3 and len(ort.sent) == 2
    assert 0 < ort.sent[-1] <= execute.sent[-1]


def test_template_counts_refused_requests_by_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton counts a request the model refused (400) as a success: the model's own counter tells a dashboard that
    clients send wrong tensors (form) or wrong values (an image sent as 0-255)."""
    _FakeMetricFamily.made = {}
    model, _ = _tiny_template_model(tmp_path, monkeypatch, _FakeMetricFamily)
    family = _FakeMetricFamily.made["medops_input_refused_total"]
    assert family.kind == "counter"
    form, values = family.metrics
    assert (form.labels["reason"], values.labels["reason"]) == ("form", "values")
    responses = model.execute([_FakeRequest(r) for r in (
        {"image": _FakeTensor("image", BATCH[:1] * 255)},
        {"image": _FakeTensor("image", BATCH[:1].astype(np.float64))},
        {},
        {"image": _FakeTensor("image", BATCH[1:3])},
    )])
    assert [r.error is None for r in responses] == [False, False, False, True]
    assert form.sent == [2] and values.sent == [1]
    model.execute([_FakeRequest({"image": _FakeTensor("image", np.zeros((1, 1, 5, 5), np.float32))})])
    assert form.sent == [2, 1] and values.sent == [1]  # every request refused: still counted
    model.execute([_FakeRequest({"image": _FakeTensor("image", BATCH[:2])})])
    assert form.sent == [2, 1] and values.sent == [1]  # nothing refused: nothing sent
    model.finalize()


def test_template_serves_when_its_counters_cannot_be_registered(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A Triton that refuses a metric family (a name clash, say) gets a model without counters, not a failed load."""
    class Refused(_FakeMetricFamily):
        def __init__(self, name: str, description: str, kind: str) -> None:
            raise RuntimeError(f"metric family {name} exists with another description")

    model, log = _tiny_template_model(tmp_path, monkeypatch, Refused)
    assert model.cost is None
    assert any("CPU-time counters off: RuntimeError: metric family" in line for line in log)
    response = model.execute([_FakeRequest({"image": _FakeTensor("image", BATCH[:2])})])[0]
    assert response.error is None and response.output_tensors[0].as_numpy().shape == (2, 3)
    model.finalize()


# ---------------------------------------------------------------- real server


@pytest.mark.slow
def test_server_ready_and_addresses(server: TritonServer) -> None:
    assert server.is_ready()
    assert server.http_url == f"127.0.0.1:{server.http_port}"
    assert server.grpc_url == f"127.0.0.1:{server.grpc_port}"
    with httpclient.InferenceServerClient(server.http_url) as client:
        assert client.is_model_ready("tiny")
        config = client.get_model_config("tiny")
    assert config["max_batch_size"] == 8 and config["input"][0]["dims"] == [1, 4, 4]


@pytest.mark.slow
def test_http_infer_matches_onnxruntime(server: TritonServer, repo: Path) -> None:
    inp = httpclient.InferInput("image", list(BATCH.shape), "FP32")
    inp.set_data_from_numpy(BATCH, binary_data=True)
    with httpclient.InferenceServerClient(server.http_url) as client:
        result = client.infer("tiny", [inp], outputs=[httpclient.InferRequestedOutput("probabilities")])
    probs = result.as_numpy("probabilities")
    assert probs.shape == (5, 3) and probs.dtype == np.float32
    assert np.abs(probs - reference(BATCH, repo / "tiny" / "1" / "model.onnx")).max() < 1e-6


@pytest.mark.slow
def test_grpc_infer_matches_onnxruntime(server: TritonServer, repo: Path) -> None:
    inp = grpcclient.InferInput("image", list(BATCH.shape), "FP32")
    inp.set_data_from_numpy(BATCH)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        result = client.infer("tiny", [inp], outputs=[grpcclient.InferRequestedOutput("probabilities")])
    probs = result.as_numpy("probabilities")
    assert probs.shape == (5, 3)
    assert np.abs(probs - reference(BATCH, repo / "tiny" / "1" / "model.onnx")).max() < 1e-6


@pytest.mark.slow
def test_class_labels_from_labels_txt(server: TritonServer, repo: Path) -> None:
    inp = httpclient.InferInput("image", list(BATCH.shape), "FP32")
    inp.set_data_from_numpy(BATCH)
    requested = [httpclient.InferRequestedOutput("probabilities", class_count=2)]
    with httpclient.InferenceServerClient(server.http_url) as client:
        result = client.infer("tiny", [inp], outputs=requested)
    top = result.as_numpy("probabilities")
    assert top.shape == (5, 2)
    expected = reference(BATCH, repo / "tiny" / "1" / "model.onnx")
    for row, probs in zip(top, expected, strict=True):
        score, index, label = row[0].decode().split(":")
        assert int(index) == int(probs.argmax())
        assert label == LABELS[int(index)]
        assert abs(float(score) - probs.max()) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(
    ("array", "datatype", "needles"),
    [
        (np.zeros((2, 1, 5, 5), np.float32), "FP32", ("shape", "[2,1,5,5]", "[-1,1,4,4]")),
        (BATCH.astype(np.float64), "FP64", ("data-type is 'FP64'", "expects 'FP32'")),
    ],
    ids=["wrong-shape", "fp64"],
)
def test_malformed_request_gets_clear_error(server: TritonServer, array, datatype, needles) -> None:
    for module, url in ((httpclient, server.http_url), (grpcclient, server.grpc_url)):
        inp = module.InferInput("image", list(array.shape), datatype)
        inp.set_data_from_numpy(array)
        with module.InferenceServerClient(url) as client, pytest.raises(InferenceServerException) as info:
            client.infer("tiny", [inp])
        message = str(info.value)
        assert "image" in message
        for needle in needles:
            assert needle in message, message
    assert server.is_ready()
    good = httpclient.InferInput("image", [1, 1, 4, 4], "FP32")
    good.set_data_from_numpy(BATCH[:1])
    with httpclient.InferenceServerClient(server.http_url) as client:
        assert client.infer("tiny", [good]).as_numpy("probabilities").shape == (1, 3)


@pytest.mark.slow
def test_log_names_the_onnxruntime_provider(server: TritonServer) -> None:
    log = server.log_text()
    assert "providers in use: CPUExecutionProvider" in log
    assert "successfully loaded 'tiny'" in log


@pytest.mark.slow
def test_metrics_endpoint(server: TritonServer) -> None:
    inp = httpclient.InferInput("image", [2, 1, 4, 4], "FP32")
    inp.set_data_from_numpy(BATCH[:2])
    with httpclient.InferenceServerClient(server.http_url) as client:
        client.infer("tiny", [inp])
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    success = [line for line in text.splitlines() if line.startswith("nv_inference_request_success{")]
    assert any('model="tiny"' in line and float(line.rsplit(" ", 1)[1]) >= 1 for line in success), success


@pytest.mark.slow
def test_context_manager_stop_ends_process_and_frees_port(repo: Path, tmp_path: Path) -> None:
    http, grpc, metrics = distinct_ports()
    log_file = tmp_path / "logs" / "triton.log"
    with TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, log_file=log_file) as srv:
        assert srv.is_ready()
        assert not port_is_free(http)
        process = srv.process
    assert process.poll() is not None
    assert srv.returncode == 0
    assert not srv.is_ready()
    assert port_is_free(http) and port_is_free(grpc) and port_is_free(metrics)
    assert "Started HTTPService at 127.0.0.1:" in log_file.read_text()
    assert srv.stop() == 0  # stopping twice is harmless


@pytest.mark.slow
def test_broken_model_fails_fast_with_server_log(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "broken", model_py="class TritonPythonModel(:\n    pass\n")
    http, grpc, metrics = distinct_ports()
    srv = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics)
    began = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        srv.start(timeout=60)
    elapsed = time.monotonic() - began
    message = str(info.value)
    assert "exited with code" in message
    assert "broken" in message and "SyntaxError" in message, message
    assert elapsed < 30, f"start() took {elapsed:.1f} s: it waited for the timeout instead of failing fast"
    assert srv.process.poll() is not None
