"""Rollouts on a real Triton: promotion gate, promote/rollback under load, canary and shadow trials."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from serve import rollout
from serve.triton_server import TritonServer, free_port
from tests.conftest import FAST, REPO, run_cli, write_medmnist

MODEL = "breast"


def export(run: Path, repo: Path) -> int:
    from export.build import export_model

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="export", overrides=[f"run={run}", f"name={MODEL}", f"model_repository={repo}",
                                                      "drift.embeddings=false"])
    return int(export_model(cfg)["version"])


@pytest.fixture(scope="module")
def worse_run(tmp_path_factory: pytest.TempPathFactory, breastmnist_small: Path) -> Path:
    """A model trained on flipped labels: a real, parity-clean export that is clearly worse."""
    src = np.load(breastmnist_small)
    splits = {s: (src[f"{s}_images"], 1 - src[f"{s}_labels"].reshape(-1)) for s in ("train", "val", "test")}
    data = write_medmnist(tmp_path_factory.mktemp("flipped") / "flipped.npz", splits)
    run_dir = tmp_path_factory.mktemp("runs") / "worse"
    run_cli(*FAST, f"data.path={data}", "data.md5=false", "trainer.max_epochs=10",
            "callbacks.ema=null", run_dir=run_dir)  # no weight averaging: a few epochs really train it
    return run_dir


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, trained_run: Path, worse_run: Path) -> Path:
    """v1 and v2: the trained run (equal quality); v3: the flipped-label run."""
    repo = tmp_path_factory.mktemp("rollout") / "model_repository"
    assert [export(trained_run, repo), export(trained_run, repo), export(worse_run, repo)] == [1, 2, 3]
    return repo


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"  # kept: a server that died says why here
    server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          model_control="explicit", load_models=[MODEL], log_file=log)
    server.start(timeout=120)
    try:
        yield server
    finally:
        died = server.returncode
        server.stop()
        if died is not None:  # the module's later tests failed with "connection refused": show the cause
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
            pytest.fail(f"tritonserver died during the rollout tests (exit {died}); log {log}, last lines:\n{tail}")


def ensure_production(repo: Path, server: TritonServer) -> None:
    """Tests may run alone (-k): give the model a production version if it has none yet."""
    if rollout.read_state(repo, MODEL).production is None:
        rollout.promote(repo, MODEL, 1, url=server.http_url)


def ready_versions(server: TritonServer) -> set[str]:
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(server.http_url) as client:
        return {str(m["version"]) for m in client.get_model_repository_index()
                if m.get("name") == MODEL and m.get("state") == "READY"}


def serve_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


class Load:
    """Four clients sending unversioned requests until stopped; records failures and answering versions."""

    def __init__(self, url: str, images: np.ndarray, clients: int = 4) -> None:
        self.url, self.images = url, images
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok, self.failures, self.versions = 0, [], set()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(clients)]

    def run(self, seed: int) -> None:
        import tritonclient.http as httpclient

        rng = np.random.default_rng(seed)
        with httpclient.InferenceServerClient(self.url, network_timeout=60) as client:
            while not self.stop.is_set():
                batch = self.images[rng.choice(len(self.images), 8)]
                inp = httpclient.InferInput("image", list(batch.shape), "FP32")
                inp.set_data_from_numpy(batch)
                try:
                    result = client.infer(MODEL, [inp])
                    probs = result.as_numpy("probabilities")
                    assert probs.shape == (8, 2)
                    with self.lock:
                        self.ok += 1
                        self.versions.add(str(result.get_response()["model_version"]))
                except Exception as exc:  # every failure counts
                    with self.lock:
                        self.failures.append(repr(exc))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def test_promote_and_rollback_under_load_fail_no_request(repo: Path, server: TritonServer,
                                                         breastmnist_small: Path):
    images = np.load(breastmnist_small)["test_images"].astype(np.float32)[:, None] / 255
    first = rollout.promote(repo, MODEL, 1, url=server.http_url)  # no production yet: the parity gate decides
    assert first["decision"] == "promoted" and ready_versions(server) == {"1"}
    with Load(server.http_url, images) as load:
        while load.ok < 20:
            load.stop.wait(0.05)
        entry = rollout.promote(repo, MODEL, 2, data=breastmnist_small, url=server.http_url)
        assert entry["decision"] == "promoted", entry["gate"]
        assert ready_versions(server) == {"2"}
        seen = load.ok
        while load.ok < seen + 20:
            load.stop.wait(0.05)
        back = rollout.rollback(repo, MODEL, url=server.http_url)
        assert (back["from"], back["to"]) == (2, 1) and ready_versions(server) == {"1"}
        seen = load.ok
        while load.ok < seen + 20:
            load.stop.wait(0.05)
    assert load.failures == [], load.failures[:3]
    assert load.versions == {"1", "2"}  # both versions answered during the switches
    print(f"promote + rollback under 4 clients: {load.ok} requests, {len(load.failures)} failed")
    gate = entry["gate"]
    assert gate["candidate"]["auroc"] == pytest.approx(gate["production"]["auroc"])  # the same weights
    state = rollout.read_state(repo, MODEL)
    assert state.production == 1 and state.previous == []
    config = (repo / MODEL / "config.pbtxt").read_text()
    assert "specific" in config and 'key: "rollout_production"' in config


def test_gate_refuses_a_worse_model_and_records_why(repo: Path, server: TritonServer, breastmnist_small: Path):
    ensure_production(repo, server)
    before = rollout.read_state(repo, MODEL).production
    proc = serve_cli("promote", MODEL, "3", "--model-repository", str(repo), "--eval-data", str(breastmnist_small),
                     "--url", server.http_url)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "refused" in proc.stderr and "worse" in proc.stdout
    last = rollout.read_history(repo, MODEL)[-1]
    assert last["action"] == "promote" and last["to"] == 3 and last["decision"] == "refused"
    assert last["gate"]["candidate"]["auroc"] < last["gate"]["production"]["auroc"] - 0.01
    assert rollout.read_state(repo, MODEL).production == before and ready_versions(server) == {str(before)}
    # replacing a production version without an evaluation set is refused too
    no_data = rollout.promote(repo, MODEL, 2)
    assert no_data["decision"] == "refused" and "needs an evaluation set" in " ".join(no_data["gate"]["reasons"])


def test_canary_routes_a_share_and_reports_per_version(repo: Path, server: TritonServer, breastmnist_small: Path,
                                                       tmp_path: Path):
    ensure_production(repo, server)
    assert rollout.read_state(repo, MODEL).production == 1
    proc = serve_cli("canary", MODEL, "2", "--share", "0.5", "--model-repository", str(repo), "--url",
                     server.http_url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ready_versions(server) == {"1", "2"}
    out = tmp_path / "canary.csv"
    proc = serve_cli("batch", str(breastmnist_small), "--model", MODEL, "--url", server.http_url, "--out", str(out),
                     "--batch-size", "4", "--no-resume", "--log-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(Path(f"{out}.rollout.json").read_text())
    assert report["mode"] == "canary" and report["share"] == 0.5
    prod, cand = report["versions"]["1"], report["versions"]["2"]
    assert prod["requests"] + cand["requests"] == 16 and prod["images"] + cand["images"] == 64
    assert cand["requests"] > 0 and prod["requests"] > 0
    assert prod["latency_ms"]["p50"] > 0 and sum(prod["class_shares"].values()) == pytest.approx(1.0)
    assert "canary" in proc.stdout and "candidate" in proc.stdout
    assert serve_cli("end-trial", MODEL, "--model-repository", str(repo), "--url", server.http_url).returncode == 0
    assert ready_versions(server) == {"1"}


def test_shadow_answers_with_production_and_logs_disagreement(repo: Path, server: TritonServer,
                                                              breastmnist_small: Path, tmp_path: Path):
    ensure_production(repo, server)
    proc = serve_cli("shadow", MODEL, "3", "--model-repository", str(repo), "--url", server.http_url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "shadow.csv"
    proc = serve_cli("batch", str(breastmnist_small), "--model", MODEL, "--url", server.http_url, "--out", str(out),
                     "--no-resume", "--log-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(Path(f"{out}.rollout.json").read_text())["shadow"]
    assert report["compared"] == 64 and report["agreement"] < 1.0
    log_lines = Path(report["log"]).read_text().splitlines()
    assert len(log_lines) == report["disagreements"] > 0
    first = json.loads(log_lines[0])
    assert first["production"] != first["candidate"]
    # the answers are production's (v1), not the candidate's
    from serve.inputs import iter_inputs, load_item
    from serve.local_backend import LocalBackend

    local = LocalBackend(repo, MODEL, 1)
    items, _ = iter_inputs(breastmnist_small, class_names=local.info.class_names)
    expected = local.infer(np.stack([load_item(i, local.info) for i in items]))
    import csv

    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    column = f"prob_{local.info.class_names[1]}"
    by_key = {r["key"]: float(r[column]) for r in rows}
    assert np.allclose([by_key[item.key] for item in items], expected[:, 1], atol=1e-5)
    assert serve_cli("end-trial", MODEL, "--model-repository", str(repo), "--url", server.http_url).returncode == 0
    status = serve_cli("status", MODEL, "--model-repository", str(repo))
    assert status.returncode == 0 and "production 1" in status.stdout and "end shadow" in status.stdout


def test_a_new_export_waits_for_promotion(repo: Path, server: TritonServer, trained_run: Path,
                                          breastmnist_small: Path):
    import tritonclient.http as httpclient

    ensure_production(repo, server)
    production = rollout.read_state(repo, MODEL).production
    before = (repo / MODEL / "config.pbtxt").read_text()
    new = export(trained_run, repo)
    assert (repo / MODEL / "config.pbtxt").read_text() == before  # the served config is the rollout's
    assert (repo / MODEL / str(new) / "config.pbtxt").is_file()
    with httpclient.InferenceServerClient(server.http_url) as client:
        client.load_model(MODEL)  # what a poll-mode Triton would do on its own
    assert ready_versions(server) == {str(production)}
    entry = rollout.promote(repo, MODEL, new, data=breastmnist_small, url=server.http_url)
    assert entry["decision"] == "promoted" and ready_versions(server) == {str(new)}
    from medops.triton_config import parse_model_config

    config = parse_model_config((repo / MODEL / "config.pbtxt").read_text())
    assert config.parameters["rollout_production"].string_value == str(new)
    assert list(config.version_policy.specific.versions) == [new]
