"""bench/serving_cost.py: the twin that measures Triton's own CPU per request, served by a real Triton."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.serving_cost import (
    BURN_FILE,
    COST_COUNTERS,
    TEMPLATE,
    FloorTwins,
    floor_figures,
    stub_counters,
    stub_figures,
)
from medops.triton_config import build_model_config, parse_model_config, render_model_config

SIZE = 8


METRICS = """# HELP medops_execute_cpu_seconds_total CPU time of this stub in execute()
# TYPE medops_execute_cpu_seconds_total counter
medops_execute_cpu_seconds_total{model="m",stub="101",version="3"} 1.5
medops_execute_cpu_seconds_total{model="m",stub="102",version="3"} 0.5
medops_execute_cpu_seconds_total{model="m2",stub="103",version="1"} 9
medops_onnxruntime_cpu_seconds_total{model="m",stub="101",version="3"} 1.25
medops_onnxruntime_cpu_seconds_total{model="m",stub="102",version="3"} 0.25
medops_onnxruntime_cpu_seconds_total{model="m2",stub="103",version="1"} 8
medops_execute_images_total{version="3",model="m",stub="101"} 750
medops_execute_images_total{model="m",stub="102",version="3"} 250
medops_execute_images_total{model="m2",stub="103",version="1"} 4000
nv_inference_count{model="m",version="3"} 1000
"""


def _constant(path: Path, name: str) -> object:
    """The literal a module assigns to ``name`` at top level, read without importing it (it needs Triton)."""
    import ast

    tree = ast.parse(path.read_text())
    [value] = [node.value for node in tree.body if isinstance(node, ast.Assign)
               and [t.id for t in node.targets if isinstance(t, ast.Name)] == [name]]
    return ast.literal_eval(value)


def test_the_bench_reads_what_the_served_model_and_the_twin_use() -> None:
    """The names live in the stubs' model.py files (a stub cannot import medops); the bench must use the same."""
    from tests.conftest import REPO

    exported = _constant(REPO / "export" / "templates" / "model.py", "COST_COUNTERS")
    assert {key: name for key, (name, _) in exported.items()} == COST_COUNTERS
    assert _constant(TEMPLATE, "BURN_FILE") == BURN_FILE


def test_stub_counters_sum_the_models_stubs_and_no_other_model(tmp_path: Path) -> None:
    """Triton's metrics text: every stub of ``m`` (a reload overlaps two), never ``m2`` whose name starts alike."""
    page = tmp_path / "metrics"
    page.write_text(METRICS)
    assert stub_counters(page.as_uri(), "m") == {"execute": 2.0, "onnxruntime": 1.5, "images": 1000.0}
    assert stub_counters(page.as_uri(), "m2") == {"execute": 9.0, "onnxruntime": 8.0, "images": 4000.0}
    assert stub_counters(page.as_uri(), "other") == {"execute": 0.0, "onnxruntime": 0.0, "images": 0.0}


def test_stub_figures_split_the_servers_cpu() -> None:
    """Per image: onnxruntime 1.5 ms, the model's Python 0.5 ms; the server tree's 2.25 ms per image leaves
    Triton 0.25 ms per image outside execute(), 1 ms per request of 4 images."""
    before = {"execute": 1.0, "onnxruntime": 0.5, "images": 500.0}
    after = {"execute": 2.0, "onnxruntime": 1.25, "images": 1000.0}
    figures = stub_figures(before, after, 2.25, 4)
    assert figures["stub_onnxruntime_cpu_ms_per_image"] == pytest.approx(1.5)
    assert figures["stub_python_cpu_ms_per_image"] == pytest.approx(0.5)
    assert figures["outside_execute_cpu_ms_per_request"] == pytest.approx(1.0)
    assert stub_figures(before, after, None, 4)["outside_execute_cpu_ms_per_request"] is None  # no tree CPU
    assert set(stub_figures(after, after, 2.25, 4).values()) == {None}  # no counters (a model without them)


def test_floor_figures_per_request() -> None:
    """Triton's own CPU = the twin's tree CPU per request less the burn of its images; best = model / (model + it)."""
    one = floor_figures(2.0, 1.6, 1)
    assert one["triton_floor_cpu_ms_per_request"] == pytest.approx(0.4)
    assert one["best_ratio"] == pytest.approx(0.8)
    four = floor_figures(6.8, 1.6, 4)  # the same 0.4 ms per request weighs less on four images
    assert four["triton_floor_cpu_ms_per_request"] == pytest.approx(0.4)
    assert four["best_ratio"] == pytest.approx(6.4 / 6.8)
    # a reading at or below the burn, or no burn, is not a figure
    assert floor_figures(1.5, 1.6, 1) == {"triton_floor_cpu_ms_per_request": None, "best_ratio": None}
    assert floor_figures(0.3, 0.0, 1) == {"triton_floor_cpu_ms_per_request": None, "best_ratio": None}


def _model(repo: Path, name: str = "m") -> None:
    config = build_model_config(name, "python", channels=1, image_size=SIZE, num_classes=2, ood_outputs=True,
                                warmup=False, versions_to_serve=2)
    (repo / name / "3").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(render_model_config(config))
    (repo / name / "labels.txt").write_text("malignant\nbenign\n")


def test_twin_copies_the_models_config_under_its_own_name(tmp_path: Path) -> None:
    _model(tmp_path)
    twins = FloorTwins.add(tmp_path, ["m"])
    assert twins.names == {"m": "m_floor"}
    source = parse_model_config((tmp_path / "m" / "config.pbtxt").read_text())
    twin = parse_model_config((tmp_path / "m_floor" / "config.pbtxt").read_text())
    assert twin.name == "m_floor" and source.name == "m"
    # what decides the request rate and the batches is the model's: inputs, outputs, batcher, instances
    for field in ("input", "output", "max_batch_size", "dynamic_batching", "instance_group", "backend"):
        assert getattr(twin, field) == getattr(source, field), field
    assert not twin.HasField("version_policy")  # the only version, 1, is served
    assert (tmp_path / "m_floor" / "1" / "model.py").read_text() == TEMPLATE.read_text()
    assert (tmp_path / "m_floor" / "labels.txt").read_text() == "malignant\nbenign\n"
    twins.set_burn("m", 1.625)
    assert float((tmp_path / "m_floor" / "1" / BURN_FILE).read_text()) == pytest.approx(1.625)
    assert sorted(p.name for p in (tmp_path / "m_floor" / "1").iterdir()) == sorted(["model.py", BURN_FILE])


@pytest.fixture(scope="module")
def twin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, FloorTwins]]:
    from serve.triton_server import TritonServer, free_port

    repo = tmp_path_factory.mktemp("floor_repo")
    _model(repo)
    twins = FloorTwins.add(repo, ["m"])
    server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          model_control="explicit", load_models=["m_floor"])
    server.start(timeout=300)
    try:
        yield server, twins
    finally:
        server.stop()


def test_twin_burns_the_cpu_it_is_told_and_answers_zeros(twin_server: tuple[object, FloorTwins]) -> None:
    """Served by a real Triton: the requested outputs only, zeros of the config's shapes and types, and an execution
    that lasts at least the burn of its images (thread CPU time cannot run faster than the wall clock)."""
    import tritonclient.grpc as grpcclient

    from bench.served import triton_stats

    server, twins = twin_server
    twins.set_burn("m", 5.0)
    before = triton_stats(server.http_url, "m_floor")
    x = np.random.default_rng(0).random((3, 1, SIZE, SIZE), dtype=np.float32)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        inp = grpcclient.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("m_floor", [inp], outputs=[grpcclient.InferRequestedOutput("probabilities"),
                                                         grpcclient.InferRequestedOutput("ood_flag")])
    probs, flags = result.as_numpy("probabilities"), result.as_numpy("ood_flag")
    assert probs.shape == (3, 2) and probs.dtype == np.float32 and not probs.any()
    assert flags.shape == (3, 1) and flags.dtype == np.bool_ and not flags.any()
    assert result.as_numpy("ood_score") is None  # not asked for, not built
    after = triton_stats(server.http_url, "m_floor")
    assert after["requests"] - before["requests"] == 1
    assert (after["compute_infer_ns"] - before["compute_infer_ns"]) / 1e6 >= 15.0  # 3 images x 5 ms


def test_measure_gives_tritons_own_cpu_per_request(twin_server: tuple[object, FloorTwins]) -> None:
    """Through the bench's own clients: Triton's CPU per request beyond the burn is positive and far below the burn
    (CPU time, so a busy CI machine does not inflate it), and the best ratio lies between."""
    from bench.engines import ClientThreads

    server, twins = twin_server
    x = np.random.default_rng(1).random((2, 1, SIZE, SIZE), dtype=np.float32)
    clients = ClientThreads()
    try:
        figures = twins.measure(clients, server, "m", x, in_flight=2, requests=40, burn_ms_per_image=3.0)
    finally:
        clients.close()
    floor = figures["triton_floor_cpu_ms_per_request"]
    assert floor is not None and 0 < floor < 6.0
    assert figures["best_ratio"] == pytest.approx(6.0 / (6.0 + floor))
    assert figures["floor_images_per_s"] > 0
