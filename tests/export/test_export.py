"""``python -m export``: parity-gated ONNX export into a versioned Triton repository, with model cards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from hydra import compose, initialize_config_dir
from tritonclient.grpc import model_config_pb2

import export.build as pipeline
from export.parity import ParityError, parity_batch_sizes, torch_probabilities
from export.repository import RepositoryError
from export.source import ExportError
from tests.conftest import REPO
from train.datamodules import MedMNISTDataModule

pytestmark = pytest.mark.slow


def export_cfg(run: Path | None, repo: Path, *overrides: str):
    args = [f"model_repository={repo}", "name=breast", *overrides]
    if run is not None:
        args.append(f"run={run}")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="export", overrides=args, return_hydra_config=False)


def run_export_cli(*args: str, log_dir: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "export", *args, f"hydra.run.dir={log_dir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_cli_export_writes_a_parity_checked_version(tmp_path: Path, trained_run: Path) -> None:
    repo = tmp_path / "repo"
    proc = run_export_cli(f"run={trained_run}", "name=breast", f"model_repository={repo}", log_dir=tmp_path / "log")
    out = proc.stdout + proc.stderr
    assert "PASS" in out and "max |prob diff|" in out
    assert "TensorRT skipped" in out or "TensorRT FP16" in out
    version = repo / "breast" / "1"
    assert {p.name for p in version.iterdir()} >= {"model.onnx", "model.py", "config.pbtxt", "labels.txt",
                                                  "metadata.json", "MODEL_CARD.md", "model_card.json"}
    assert not list(version.glob("*.data")), "weights must live inside model.onnx"
    assert not list(tmp_path.glob(".repo-staging-*")), "staging folder left behind"

    config = parse_config(repo / "breast" / "config.pbtxt")
    assert config.backend == "python" and config.max_batch_size == 64
    assert list(config.input[0].dims) == [1, 28, 28] and list(config.output[0].dims) == [2]
    assert (repo / "breast" / "labels.txt").read_text().split() == ["malignant", "normal_or_benign"]

    meta = json.loads((version / "metadata.json").read_text())
    record = json.loads((trained_run / "run.json").read_text())
    assert meta["lineage"]["dataset_fingerprint"] == record["data"]["fingerprint"]
    assert meta["lineage"]["run_id"] == record["run_id"]
    assert config.parameters["dataset_fingerprint"].string_value == record["data"]["fingerprint"]
    parity = meta["parity"][0]
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-4 and parity["argmax_agreement"] == 1.0
    op = meta["operating_point"]  # the decision at the operating point is checked on every image too
    assert parity["decision"] == f"P({op['positive_class']}) >= {op['threshold']:.4f}"
    assert parity["decision_agreement"] == 1.0 and parity["decision_mismatches"] == 0
    assert parity["batch_sizes"] == [1, 7, 64]
    model = onnx.load(str(version / "model.onnx"))
    assert meta["opset"] >= 17 and model.graph.input[0].name == "image"

    # the exported model really gives the checkpoint's answers on the run's test images
    dm = MedMNISTDataModule(record["data"]["source"], md5=False)
    dm.setup()
    images = dm.datasets["test"].images.float().div(255).numpy()
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": images})[0]
    module = pipeline.load_source(str(trained_run)).module
    temperature = record["calibration"]["temperature"]  # fitted on val at the end of training: inside the graph
    assert temperature > 0 and meta["operating_point"]["temperature"] == temperature
    with torch.no_grad():
        want = (module.net(torch.from_numpy(images)) / temperature).softmax(-1).numpy()
    assert np.abs(got - want).max() <= 1e-4

    # the finding is the positive class: BreastMNIST declares malignant (class 0), not class 1
    assert record["data"]["positive_class"] == "malignant" and record["threshold"]["positive_index"] == 0
    assert config.parameters["positive_class"].string_value == "malignant"
    assert float(config.parameters["threshold"].string_value) == pytest.approx(record["threshold"]["value"], abs=1e-6)
    assert float(config.parameters["temperature"].string_value) == pytest.approx(temperature, abs=1e-6)

    card = (version / "MODEL_CARD.md").read_text()
    assert record["data"]["fingerprint"] in card
    assert f"{record['test']['auroc']:.4f}" in card and "not for clinical use" in card.lower()
    assert "Positive class (the finding): **malignant**" in card and f"T = {temperature:.3f}" in card
    assert f"{record['calibration']['test']['ece_after']:.4f} after" in card
    # the training figures say which decision they are at: macro precision is not the finding's PPV
    assert f"| precision (unweighted mean over the classes) | {record['val']['precision']:.4f} |" in card
    assert "at the arg-max class" in card and "| class (test, arg-max) |" in card
    assert "- Probabilities are temperature-scaled on validation" in card


def test_versions_increment_and_old_versions_stay(tmp_path: Path, trained_run: Path) -> None:
    repo = tmp_path / "repo"
    first = pipeline.export_model(export_cfg(trained_run, repo))
    second = pipeline.export_model(export_cfg(trained_run, repo, "target=onnxruntime"))
    assert (first["version"], second["version"]) == (1, 2)
    assert (repo / "breast" / "1" / "model.py").is_file() and (repo / "breast" / "2" / "model.onnx").is_file()
    config = parse_config(repo / "breast" / "config.pbtxt")  # the model root follows the newest export
    assert config.platform == "onnxruntime_onnx" and config.parameters["medops_version"].string_value == "2"
    before = snapshot(repo)
    with pytest.raises(RepositoryError, match="already exists"):
        pipeline.export_model(export_cfg(trained_run, repo, "version=1"))
    assert snapshot(repo) == before


def shift_class_bias(path: Path, index: int, delta: float) -> None:
    """Add ``delta`` to class ``index``'s entry of the exported graph's classifier bias (one float per class)."""
    model = onnx.load(str(path))
    bias = next(t for t in model.graph.initializer if list(t.dims) == [2] and t.data_type == onnx.TensorProto.FLOAT)
    values = onnx.numpy_helper.to_array(bias).copy()
    values[index] += delta
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    onnx.save(model, str(path))


def test_perturbed_onnx_fails_the_gate_and_writes_nothing(tmp_path: Path, trained_run: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real_export = pipeline.export_onnx

    def export_then_perturb(net, path, *args, **kwargs):
        real_export(net, path, *args, **kwargs)
        shift_class_bias(path, 0, 0.5)  # shift one class logit: probabilities move far beyond 1e-4
        return path

    monkeypatch.setattr(pipeline, "export_onnx", export_then_perturb)
    repo = tmp_path / "repo"
    with pytest.raises(ParityError, match="FAIL"):
        pipeline.export_model(export_cfg(trained_run, repo))
    assert snapshot(repo) == {}
    assert not list(tmp_path.glob(".repo-staging-*"))


def test_a_decision_flip_at_the_operating_point_fails_export(tmp_path: Path, trained_run: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph within a loose ``parity.atol`` whose P(positive) crosses the operating threshold on some images:
    export stops with the decision check's figures and writes nothing."""
    from rich.console import Console

    from export.source import held_out_images

    repo, quiet = tmp_path / "repo", Console(quiet=True)
    cfg = export_cfg(trained_run, repo, "parity.atol=1.0", "tensorrt.enabled=false", "drift.enabled=false")
    source = pipeline.resolve_source(cfg, quiet)
    op, _ = pipeline.clinical_evaluation(source)
    assert op.get("threshold") is not None, "the test run records an operating point"
    images = held_out_images(source, split=cfg.parity.split, limit=cfg.parity.max_images)
    probs = torch_probabilities(pipeline.graph_network(source, op, quiet), images).astype(np.float64)
    pos, threshold, temperature = int(op["positive_index"]), float(op["threshold"]), float(op.get("temperature") or 1)
    log_odds = np.log(probs[:, pos]) - np.log(probs[:, 1 - pos])
    gap = log_odds - np.log(threshold / (1 - threshold))  # >= 0: decided positive
    nearest = int(np.argmin(np.abs(gap)))
    shift = -gap[nearest] - np.copysign(1e-3, gap[nearest])  # moves the image nearest the threshold across it
    flipped = (gap >= 0) != (gap + shift >= 0)
    argmax_flipped = (log_odds >= 0) != (log_odds + shift >= 0)
    checked = sum(n for n in ((len(images) // bs) * bs or bs for bs in parity_batch_sizes(64, [1, 7, "max"])))
    mismatches = sum(int(np.resize(flipped, (len(images) // bs) * bs or bs).sum())
                     for bs in parity_batch_sizes(64, [1, 7, "max"]))
    real_export = pipeline.export_onnx

    def export_then_shift(net, path, *args, **kwargs):
        real_export(net, path, *args, **kwargs)
        shift_class_bias(path, pos, shift * temperature)  # P(positive)'s log-odds move by `shift` on every image
        return path

    monkeypatch.setattr(pipeline, "export_onnx", export_then_shift)
    with pytest.raises(ParityError) as failed:
        pipeline.export_model(cfg)
    message = str(failed.value)
    assert f"same decision (P({op['positive_class']}) >= {threshold:.4f}) {1 - mismatches / checked:.2%}" in message
    assert f"{mismatches} checked image(s) get a different decision at the operating point" in message
    assert ("argmax agreement 100.00%" in message) == (not argmax_flipped.any())
    assert snapshot(repo) == {}


def test_interrupted_export_leaves_no_folder(tmp_path: Path, trained_run: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    pipeline.export_model(export_cfg(trained_run, repo))
    before = snapshot(repo)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated interruption while writing the model card")

    monkeypatch.setattr(pipeline, "render_markdown", crash)
    with pytest.raises(KeyboardInterrupt):
        pipeline.export_model(export_cfg(trained_run, repo))
    assert snapshot(repo) == before
    assert not (repo / "breast" / "2").exists()
    assert not list(tmp_path.glob(".repo-staging-*"))


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x" * 65])
def test_model_name_with_path_characters_is_refused(tmp_path: Path, trained_run: Path, name: str) -> None:
    repo = tmp_path / "repo"
    with pytest.raises(RepositoryError, match="invalid model name"):
        pipeline.export_model(export_cfg(trained_run, repo, f"name='{name}'"))
    assert snapshot(repo) == {}


def test_missing_run_directory(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    with pytest.raises(ExportError, match="run directory not found"):
        pipeline.export_model(export_cfg(tmp_path / "nope", repo))
    proc = run_export_cli(f"run={tmp_path / 'nope'}", "name=breast", f"model_repository={repo}",
                          log_dir=tmp_path / "log", check=False)
    assert proc.returncode == 2 and "run directory not found" in proc.stdout + proc.stderr
    assert snapshot(repo) == {}


def test_checkpoint_of_another_architecture(tmp_path: Path, trained_run: Path) -> None:
    fake = tmp_path / "fake_run"
    shutil.copytree(trained_run, fake)
    record = json.loads((fake / "run.json").read_text())
    record["config"]["model"]["net"]["arch"] = "resnet50"
    record["checkpoints"]["best"] = str(fake / "checkpoints" / Path(record["checkpoints"]["best"]).name)
    (fake / "run.json").write_text(json.dumps(record))
    with pytest.raises(ExportError, match="checkpoint is a smallcnn but the run record describes a resnet50"):
        pipeline.export_model(export_cfg(fake, tmp_path / "repo"))
    alien = tmp_path / "alien.ckpt"
    torch.save({"weights": torch.zeros(3)}, alien)
    with pytest.raises(ExportError, match="not a medops training checkpoint"):
        pipeline.export_model(export_cfg(None, tmp_path / "repo", f"checkpoint={alien}"))


def test_tensorrt_target_without_tensorrt_is_refused_plainly(tmp_path: Path, trained_run: Path) -> None:
    if pipeline.tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT is available here; the GPU test covers it")
    with pytest.raises(ExportError, match="target=tensorrt needs TensorRT, which is not available here"):
        pipeline.export_model(export_cfg(trained_run, tmp_path / "repo", "target=tensorrt"))
    assert snapshot(tmp_path / "repo") == {}


def test_exported_python_model_serves_on_the_bundled_triton(tmp_path: Path, trained_run: Path) -> None:
    """The exported version loads in a real tritonserver and answers like the checkpoint."""
    import tritonclient.http as httpclient

    from serve.triton_server import TritonServer, free_port

    repo = tmp_path / "repo"
    pipeline.export_model(export_cfg(trained_run, repo))
    record = json.loads((trained_run / "run.json").read_text())
    dm = MedMNISTDataModule(record["data"]["source"], md5=False)
    dm.setup()
    images = dm.datasets["test"].images[:20].float().div(255).numpy()
    module = pipeline.load_source(str(trained_run)).module
    with torch.no_grad():  # calibrated at the end of training: the temperature is in the served graph
        want = (module.net(torch.from_numpy(images)) / record["calibration"]["temperature"]).softmax(-1).numpy()
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    with TritonServer(repo, **ports).start(timeout=120) as server:
        with httpclient.InferenceServerClient(server.http_url) as client:
            meta = client.get_model_metadata("breast")
            assert meta["inputs"][0]["shape"] == [-1, 1, 28, 28]
            inp = httpclient.InferInput("image", list(images.shape), "FP32")
            inp.set_data_from_numpy(images)
            got = client.infer("breast", [inp]).as_numpy("probabilities")
        assert "CPUExecutionProvider" in server.log_text()
    assert np.abs(got - want).max() <= 1e-4


def test_optimize_switch_simplifies_the_graph(tmp_path: Path, trained_run: Path) -> None:
    plain = pipeline.export_model(export_cfg(trained_run, tmp_path / "a", "optimize=false"))
    simplified = pipeline.export_model(export_cfg(trained_run, tmp_path / "b", "optimize=true"))
    assert plain["parity"][0]["passed"] and simplified["parity"][0]["passed"]
    nodes = [len(onnx.load(str(tmp_path / r / "breast" / "1" / "model.onnx")).graph.node) for r in ("a", "b")]
    assert nodes[1] < nodes[0], nodes


def test_run_latest_picks_the_newest_completed_run(tmp_path: Path, trained_run: Path) -> None:
    import os

    from export.source import latest_run

    logs = tmp_path / "logs"
    older, newer, broken = logs / "a" / "runs" / "1", logs / "b" / "runs" / "2", logs / "b" / "runs" / "3"
    for d in (older, newer):
        shutil.copytree(trained_run, d)
    broken.mkdir(parents=True)
    (broken / "run.json").write_text(json.dumps({"status": "running"}))
    os.utime(older / "run.json", (1, 1))
    assert latest_run(logs) == newer
    meta = pipeline.export_model(export_cfg(None, tmp_path / "repo", "run=latest", f"paths.log_dir={logs}"))
    assert meta["lineage"]["checkpoint"].startswith(str(newer))
    with pytest.raises(ExportError, match="no completed training run"):
        latest_run(tmp_path / "empty")


class _Entry:
    def __init__(self, ref: str) -> None:
        self.ref = ref


class _Artifact:
    type = "model"

    def __init__(self, ckpt: Path) -> None:
        self.name = "model-abc123:v0"
        self.manifest = type("Manifest", (), {"entries": {ckpt.name: _Entry(ckpt.as_uri())}})()

    def download(self) -> str:
        raise AssertionError("a local file reference must be used, not a download")


class _Run:
    def __init__(self, ckpt: Path, record: dict) -> None:
        self.id = "abc123"
        self.config = {**record["config"], "data_summary": record["data"], "git": record["git"]}
        self.summary = {f"test/{k}": v for k, v in record["test"].items()} | {"test/plots": {"_type": "images"}}
        self._artifact = _Artifact(ckpt)

    def logged_artifacts(self) -> list:
        return [self._artifact]


@pytest.mark.parametrize("with_local_record", [True, False])
def test_export_from_a_wandb_run_path(tmp_path: Path, trained_run: Path, monkeypatch: pytest.MonkeyPatch,
                                      with_local_record: bool) -> None:
    """`run=entity/project/run_id` goes through the real wandb.Api call (the service itself is replaced)."""
    import wandb

    record = json.loads((trained_run / "run.json").read_text())
    ckpt = Path(record["checkpoints"]["best"])
    if not with_local_record:  # the checkpoint alone: the record is rebuilt from the W&B config and summary
        lone = tmp_path / "lone" / "model.ckpt"
        lone.parent.mkdir()
        shutil.copy(ckpt, lone)
        ckpt = lone
    calls = []

    class FakeApi:
        def __init__(self, timeout: int | None = None) -> None:
            calls.append(timeout)

        def run(self, path: str) -> _Run:
            if path != "lab/medops/abc123":
                raise ValueError(f"Could not find run {path}")
            return _Run(ckpt, record)

    monkeypatch.setattr(wandb, "Api", FakeApi)
    meta = pipeline.export_model(export_cfg(None, tmp_path / "repo", "run=lab/medops/abc123"))
    assert calls == [30]
    assert meta["lineage"]["checkpoint"] == str(ckpt.resolve())
    assert meta["lineage"]["dataset_fingerprint"] == record["data"]["fingerprint"]
    assert meta["lineage"]["wandb_run"] == "abc123"
    assert meta["metrics"]["test"]["auroc"] == pytest.approx(record["test"]["auroc"])
    with pytest.raises(ExportError, match="W&B run lab/medops/nope cannot be read"):
        pipeline.export_model(export_cfg(None, tmp_path / "repo2", "run=lab/medops/nope"))
    assert snapshot(tmp_path / "repo2") == {}


def test_evaluated_run_exports_its_operating_point_and_calibration(tmp_path: Path, trained_run: Path) -> None:
    """evaluation.evaluate (calibrate=true) -> export: CIs in the card, temperature in the graph, threshold served."""
    from serve.local_backend import LocalBackend
    from serve.predict import predict_files

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    proc = subprocess.run([sys.executable, "-m", "evaluation.evaluate", f"run={run}", "calibrate=true",
                           "n_resamples=200",
                           f"hydra.run.dir={tmp_path / 'eval_log'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    op = json.loads((run / "operating_point.json").read_text())
    assert op["threshold"] is not None and op["temperature"] > 0

    repo = tmp_path / "repo"
    meta = pipeline.export_model(export_cfg(run, repo))
    assert meta["parity"][0]["passed"]  # parity against the temperature-scaled network
    config = parse_config(repo / "breast" / "config.pbtxt")
    assert float(config.parameters["threshold"].string_value) == pytest.approx(op["threshold"], abs=1e-6)
    assert float(config.parameters["temperature"].string_value) == pytest.approx(op["temperature"], abs=1e-6)
    card = (repo / "breast" / "1" / "MODEL_CARD.md").read_text()
    assert "## Clinical evaluation" in card and "95% CI" in card and "temperature scaling" in card

    images = MedMNISTDataModule(json.loads((run / "run.json").read_text())["data"]["source"], md5=False)
    images.setup()
    x = images.datasets["test"].images[:8].float().div(255)
    module = pipeline.load_source(str(run)).module
    with torch.no_grad():
        want = (module.net(x) / op["temperature"]).softmax(-1).numpy()
    backend = LocalBackend(repo, "breast")
    got = backend.infer(x.numpy())
    assert np.abs(got - want).max() <= 1e-4  # calibrated probabilities come out of the exported model
    npy = tmp_path / "img.npy"
    np.save(npy, (x[0, 0].numpy() * 255).astype(np.uint8))
    (result,) = predict_files([npy], backend, top_k=2)
    pos = result["decision"]["positive_class"]
    expected = pos if result["probabilities"][backend.info.class_names.index(pos)] >= op["threshold"] else \
        next(c for c in backend.info.class_names if c != pos)
    assert result["decision"]["class"] == expected and result["decision"]["threshold"] == pytest.approx(op["threshold"])


def snapshot(repository: Path) -> dict[str, int]:
    """Relative path -> size of every file under ``repository`` (to prove it was left unchanged)."""
    if not repository.exists():
        return {}
    return {str(p.relative_to(repository)): p.stat().st_size for p in sorted(repository.rglob("*")) if p.is_file()}


def test_an_ensemble_exports_as_one_graph_equal_to_the_trained_ensemble(tmp_path: Path,
                                                                         breastmnist_small: Path) -> None:
    """A deep ensemble with test-time flips (the strong recipe's form) becomes ONE model.onnx whose probabilities
    are the trained ensemble's (every member, both views, the fitted temperature) and whose card says what it is."""
    from tests.conftest import FAST, run_cli
    from train.module import ClassificationModule

    run = tmp_path / "run"
    run_cli(*FAST, f"data.path={breastmnist_small}", "data.md5=false", "trainer.max_epochs=2", "recipe.steps=null",
            "model.net.members=2", "model.net.tta=hflip", run_dir=run)
    record = json.loads((run / "run.json").read_text())
    run_export_cli(f"run={run}", "name=ens", f"model_repository={tmp_path / 'repo'}", log_dir=tmp_path / "log")
    version = tmp_path / "repo" / "ens" / "1"
    meta = json.loads((version / "metadata.json").read_text())
    assert meta["model"]["members"] == 2 and meta["model"]["tta"] == "hflip"
    assert sorted(f.name for f in version.glob("*.onnx")) == ["embedding.onnx", "model.onnx"]  # one model graph
    assert "deep ensemble of 2 x smallcnn" in (version / "MODEL_CARD.md").read_text()

    module = ClassificationModule.load_from_checkpoint(record["checkpoints"]["best"], map_location="cpu",
                                                       weights_only=False).eval()
    images = np.load(breastmnist_small)["test_images"][:16, None].astype(np.float32) / 255.0
    x = torch.from_numpy(images)
    with torch.no_grad():  # the trained form, spelt out: member logits over the image and its mirror, averaged
        z = module.net[0](x)
        members = module.net[1].members
        logits = (torch.stack([m(z) for m in members]).mean(0) + torch.stack([m(z.flip(-1)) for m in members]).mean(0))
        expected = torch.softmax(logits / 2 / record["calibration"]["temperature"], dim=-1).numpy()
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"image": images})[0]
    assert np.allclose(got, expected, atol=1e-5)
    assert meta["ood"]["dimensions"] == 2 * 32  # both members' penultimate features feed the OOD score
