"""The real training CLI (``python -m train``) end to end, in subprocesses, on CPU."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import FAST, REPO, run_cli
from tests.wandb_log import artifacts, final_summary, history, logged_keys, run_config, run_header
from train.datamodules import MedMNISTDataModule

pytestmark = pytest.mark.slow
METRIC_KEYS = {"acc", "auroc", "precision", "recall", "f1", "loss"}


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "csv" / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def val_auroc_by_epoch(run_dir: Path) -> dict[int, float]:
    return {int(r["epoch"]): float(r["val/auroc"]) for r in read_metrics(run_dir) if r.get("val/auroc")}


def test_fast_dev_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "fdr"
    proc = run_cli("debug=fdr", "model=smallcnn", "model.net.width=8", run_dir=run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed"
    assert record["data"]["fingerprint"].startswith("sha256:")
    assert "val/auroc" in proc.stdout + proc.stderr or record["val"]
    assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_short_real_fit_improves_and_records_everything(tmp_path: Path, breastmnist_small: Path) -> None:
    run_dir = tmp_path / "fit"
    run_cli("logger=csv", "model=resnet18", "model.net.width=16", "trainer=cpu", "trainer.precision=32-true",
            "callbacks.model_summary=null", f"data.path={breastmnist_small}", "data.md5=false",
            "trainer.max_epochs=8", "callbacks.ema.decay=0.9", "model.optimizer.lr=0.003", run_dir=run_dir)
    aurocs = val_auroc_by_epoch(run_dir)
    assert len(aurocs) == 8
    assert max(aurocs.values()) > aurocs[0] + 0.1, aurocs

    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["epochs"] == 8
    assert set(record["test"]) >= METRIC_KEYS and 0.0 <= record["test"]["auroc"] <= 1.0
    assert record["val"]["auroc"] == pytest.approx(max(aurocs.values()), abs=1e-4)  # best epoch kept
    assert Path(record["checkpoints"]["best"]).is_file() and Path(record["checkpoints"]["last"]).is_file()
    dm = MedMNISTDataModule(str(breastmnist_small))
    dm.setup()
    assert record["data"]["fingerprint"] == dm.fingerprint
    assert record["data"]["mean"] == dm.mean and record["data"]["counts"]["train"] == dm.class_counts()
    assert record["git"].keys() == {"commit", "dirty"}
    assert record["versions"]["torch"] == torch.__version__.split("+")[0] or record["versions"]["torch"]
    assert record["config"]["model"]["net"]["arch"] == "resnet18"
    for name in ("roc", "confusion_matrix"):
        png = run_dir / record["plots"][name]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert sum(map(sum, record["confusion_matrix"])) == 64  # every test image counted once
    assert record["threshold"]["method"] == "youden_j_on_val"
    # the finding is the positive class (BreastMNIST declares malignant = class 0); figures are calibrated
    assert record["data"]["positive_class"] == "malignant" and record["data"]["positive_class_declared"]
    assert record["threshold"]["positive_class"] == "malignant" and record["threshold"]["positive_index"] == 0
    cal = record["calibration"]
    assert cal["temperature"] > 0 and record["threshold"]["calibrated"]
    assert cal["val"]["nll_after"] <= cal["val"]["nll_before"] + 1e-9  # fitted to minimise validation NLL
    assert set(cal["test"]) == {"ece_before", "ece_after", "nll_before", "nll_after", "consistency"}
    consistency = cal["test"]["consistency"]  # what a perfectly calibrated model would show on 64 test images
    assert consistency["ece"] == pytest.approx(cal["test"]["ece_after"])
    assert 0 < consistency["null_median"] <= consistency["null_p95"] and 0 < consistency["p_value"] <= 1


def test_multiclass_rgb_learns(tmp_path: Path, rgb_multiclass: Path) -> None:
    run_dir = tmp_path / "rgb"
    run_cli(*FAST, "data=medmnist", f"data.path={rgb_multiclass}", "data.md5=false", "data.name=rgb",
            "model.net.width=16", "trainer.max_epochs=6", "callbacks.ema.decay=0.8", "model.optimizer.lr=0.005",
            "data.batch_size=16", "data.ordinal_cutoff=1",
            run_dir=run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    names = record["data"]["class_names"]
    assert record["data"]["channels"] == 3 and len(names) == 3
    assert record["test"]["acc"] > 0.8, record["test"]
    assert "threshold" not in record  # the binary operating point is for binary tasks
    assert len(record["confusion_matrix"]) == 3
    # the declared ordinal cut-off: class 1 and every later class are "abnormal", one decision on P(abnormal)
    abnormal = record["abnormal"]
    assert abnormal["classes"] == names[1:] and abnormal["normal_classes"] == names[:1]
    assert record["data"]["abnormal"]["classes"] == names[1:] and record["data"]["modalities"] == []
    assert 0 < abnormal["value"] < 1 and abnormal["test"]["auroc"] > 0.8
    assert {"sensitivity", "specificity", "ppv", "npv"} <= set(abnormal["test"])
    # export carries it to Triton's parameters, and serve predict decides with it
    repo = tmp_path / "repo"
    export = subprocess.run([sys.executable, "-m", "export", f"run={run_dir}", "name=rgb", f"model_repository={repo}",
                             f"hydra.run.dir={tmp_path / 'export'}", "drift.enabled=false"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stderr[-3000:]
    config = (repo / "rgb" / "config.pbtxt").read_text()
    assert "abnormal_classes" in config and f"{abnormal['value']:.6f}" in config
    from PIL import Image

    image = tmp_path / "c2.png"
    test = np.load(rgb_multiclass)
    index = int(np.flatnonzero(test["test_labels"].reshape(-1) == 2)[0])
    Image.fromarray(test["test_images"][index]).save(image)
    from serve.client import open_backend
    from serve.predict import predict_files

    (result,) = predict_files([image], open_backend("local", model="rgb", model_repository=repo))
    decision = result["decision"]
    assert decision["abnormal_classes"] == names[1:] and decision["threshold"] == pytest.approx(abnormal["value"])
    assert decision["p_abnormal"] == pytest.approx(sum(result["probabilities"][1:]), abs=1e-5)
    assert decision["abnormal"] == (decision["p_abnormal"] >= decision["threshold"])


def test_bad_data_fails_before_training_with_the_file_named(tmp_path: Path) -> None:
    run_dir = tmp_path / "bad"
    missing = tmp_path / "nowhere.npz"
    proc = run_cli(*FAST, f"data.path={missing}", run_dir=run_dir, check=False)
    assert proc.returncode == 2
    assert f"{missing}: dataset file not found" in proc.stdout + proc.stderr
    assert not (run_dir / "checkpoints").exists()


def test_resume_after_kill(tmp_path: Path, breastmnist_small: Path) -> None:
    run_dir = tmp_path / "resume"
    args = [*FAST, f"data.path={breastmnist_small}", "data.md5=false", "trainer.max_epochs=6",
            "trainer.limit_train_batches=4", "callbacks.model_checkpoint.every_n_train_steps=1",
            "data.batch_size=32"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "train", f"hydra.run.dir={run_dir}", *args]
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # kill once training is past its first two epochs, mid-epoch
            if last.is_file() and (run_dir / "csv" / "metrics.csv").is_file():
                try:
                    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
                except Exception:  # being written right now
                    step = 0
                if step >= 10:
                    break
            if first.poll() is not None:
                pytest.fail("training finished before it could be interrupted")
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait(timeout=60)
    killed_at = torch.load(last, map_location="cpu", weights_only=False)
    assert killed_at["global_step"] < 24, "the run was killed too late to test resuming"

    proc = run_cli(*args, f"ckpt_path={run_dir}", run_dir=run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["resumed_from"] == str(last)
    assert record["status"] == "completed"
    assert record["global_step"] == 24  # 6 epochs x 4 batches: continued, not restarted
    assert record["epochs"] == 6
    assert "Restored all states from the checkpoint" in proc.stdout + proc.stderr
    final = torch.load(last, map_location="cpu", weights_only=False)
    assert final["global_step"] == 24 and final["epoch"] == 5


def test_resume_from_an_end_of_epoch_checkpoint(tmp_path: Path, breastmnist_small: Path) -> None:
    """The default last.ckpt is written after validation; resuming from it skips that validation and must not crash.

    (Regression: early stopping checked at train-epoch end found no val/auroc in the resumed process.)
    """
    args = [*FAST, f"data.path={breastmnist_small}", "data.md5=false", "trainer.max_epochs=4",
            "trainer.limit_train_batches=4", "data.batch_size=32"]
    snaps = tmp_path / "snaps"  # a second checkpoint callback keeps every end-of-epoch state, like last.ckpt had
    run_cli(*args, "+callbacks.snap._target_=lightning.pytorch.callbacks.ModelCheckpoint",
            f"+callbacks.snap.dirpath={snaps}", "+callbacks.snap.save_top_k=-1",
            "+callbacks.snap.save_on_train_epoch_end=false", run_dir=tmp_path / "full")
    after_epoch_2 = tmp_path / "after_epoch_2.ckpt"
    shutil.copy(next(snaps.glob("epoch=1-step=8.ckpt")), after_epoch_2)
    proc = run_cli(*args, f"ckpt_path={after_epoch_2}", run_dir=tmp_path / "resumed")
    record = json.loads((tmp_path / "resumed" / "run.json").read_text())
    assert record["status"] == "completed" and record["global_step"] == 16 and record["epochs"] == 4
    assert "Restored all states from the checkpoint" in proc.stdout + proc.stderr
    assert set(record["test"]) >= METRIC_KEYS


def test_ddp_two_cpu_processes_one_run_dir_one_wandb_run(tmp_path: Path, breastmnist_small: Path) -> None:
    logs = tmp_path / "logs"
    run_dir = logs / "ddp"
    common = ("logger=default", "model=smallcnn", "model.net.width=8", f"data.path={breastmnist_small}",
              "data.md5=false", "trainer.max_epochs=2", "callbacks.model_summary=null", f"paths.log_dir={logs}")
    run_cli("trainer=ddp_sim", *common, run_dir=run_dir, timeout=900)
    assert [p.name for p in logs.iterdir()] == ["ddp"]  # the second process did not make its own folder
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["trainer"]["devices"] == 2
    assert record["trainer"]["strategy"] == "ddp"
    assert set(record["test"]) >= METRIC_KEYS
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs

    # the same metrics format as a single-process run: run.json sections and keys, CSV columns
    single_dir = tmp_path / "single"
    run_cli("trainer=cpu", "trainer.precision=32-true", *common, run_dir=single_dir, timeout=900)
    single = json.loads((single_dir / "run.json").read_text())
    assert single["trainer"]["devices"] == 1
    assert set(record) == set(single)
    for section in ("val", "test", "threshold", "checkpoints", "data"):
        assert set(record[section]) == set(single[section]), section
    assert set(record["threshold"]["test"]) == set(single["threshold"]["test"])
    assert list(read_metrics(run_dir)[0]) == list(read_metrics(single_dir)[0])  # CSV header, in order
    assert len(read_metrics(run_dir)) > 0 and len(list((single_dir / "wandb").glob("offline-run-*"))) == 1


def test_wandb_offline_run_has_the_config(tmp_path: Path, breastmnist_small: Path) -> None:
    run_dir = tmp_path / "wb"
    run_cli("logger=default", "model=smallcnn", "model.net.width=8", "trainer=cpu", "trainer.max_epochs=2",
            "trainer.limit_train_batches=2", f"data.path={breastmnist_small}", "data.md5=false",
            "callbacks.model_summary=null", "tags=[pytest,wandb]", run_dir=run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    wb = record["wandb"]
    assert wb["mode"] == "offline" and wb["sync_command"].startswith("wandb sync ")
    run_folder = Path(wb["dir"])
    assert run_folder.parent == run_dir / "wandb" and run_folder.name.startswith("offline-run-")
    (log_file,) = run_folder.glob("run-*.wandb")
    config = run_config(log_file)  # what `wandb sync` would upload
    assert config["model"]["net"]["arch"] == "smallcnn"
    assert config["data_summary"]["fingerprint"] == record["data"]["fingerprint"]
    assert config["git"] == record["git"] and config["tags"] == ["pytest", "wandb"]
    assert history(log_file, "test/auroc") == [pytest.approx(record["test"]["auroc"])]
    assert len(history(log_file, "val/auroc")) == 2  # one per epoch
    summary = final_summary(log_file)
    assert summary["test/auroc"] == pytest.approx(record["test"]["auroc"])
    assert summary["best_val/auroc"] == pytest.approx(record["val"]["auroc"])
    header = run_header(log_file)
    assert header["name"].startswith("model=smallcnn") and {"smallcnn", "breast_small"} <= set(header["tags"])
    assert header["group"] == "train"
    keys = logged_keys(log_file)
    for chart in ("roc_curve_table", "pr_curve_table", "confusion_matrix_table", "sample_predictions"):
        assert any(k.startswith(f"test/{chart}") for k in keys), (chart, sorted(keys))
    (model,) = [a for a in artifacts(log_file) if a["type"] == "model"]
    best = Path(record["checkpoints"]["best"])
    assert model["files"] == {best.name: best.as_uri()}  # offline: a reference to the local file
    assert model["metadata"]["test"]["auroc"] == pytest.approx(record["test"]["auroc"])
    assert model["metadata"]["dataset_fingerprint"] == record["data"]["fingerprint"]


def test_deterministic_runs_are_identical(tmp_path: Path, breastmnist_small: Path) -> None:
    args = [*FAST, f"data.path={breastmnist_small}", "data.md5=false", "trainer.max_epochs=2",
            "trainer.limit_train_batches=3", "deterministic=true", "seed=7"]
    records = []
    for name in ("a", "b"):
        run_cli(*args, run_dir=tmp_path / name)
        records.append(json.loads((tmp_path / name / "run.json").read_text()))
    assert records[0]["test"] == records[1]["test"]
    weights = [torch.load(r["checkpoints"]["last"], map_location="cpu", weights_only=False)["state_dict"]
               for r in records]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_last_checkpoint_is_the_last_epoch_not_the_best(tmp_path: Path, breastmnist_small: Path) -> None:
    """last.ckpt (what a killed run resumes from) follows every epoch even when the best one is long past."""
    run_dir = tmp_path / "run"
    run_cli(*FAST, f"data.path={breastmnist_small}", "data.md5=false", "trainer.max_epochs=3", "recipe.steps=null",
            "trainer.limit_train_batches=2", "recipe.monitor=epoch", "recipe.mode=min",  # best = the first epoch
            "callbacks.early_stopping=null", run_dir=run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    best = torch.load(record["checkpoints"]["best"], map_location="cpu", weights_only=False)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert best["epoch"] == 0 and last["epoch"] == 2 and last["global_step"] == 6
