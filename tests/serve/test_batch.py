"""serve.batch: predictions CSV, resume, errors, metrics and latency; against a real Triton (``served``) and fakes."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from medops.run_record import RunRecordError, latest_run
from serve.batch import BatchSummary, auroc, compare_with_run, csv_columns, run_batch
from serve.client import TritonBackend
from serve.contract import ModelInfo, ServeError
from serve.inputs import InputItem, iter_inputs
from serve.local_backend import LocalBackend
from tests.conftest import REPO

DATA = REPO / "tests" / "data"
CLASSES = ["benign", "malignant"]


def operating_point(repository: Path, model: str = "breast") -> tuple[float, str]:
    """The threshold and positive class export recorded for version 1 (read independently of serve)."""
    op = json.loads((repository / model / "1" / "metadata.json").read_text())["operating_point"]
    return float(op["threshold"]), str(op["positive_class"])


def decided(probs: np.ndarray, classes: list[str], threshold: float, positive: str) -> str:
    """The class at the operating point: the positive class when P(positive) >= threshold, else the other."""
    pos = classes.index(positive)
    return positive if probs[pos] >= threshold else classes[1 - pos]


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def probs_of(row: dict[str, str], classes: list[str]) -> np.ndarray:
    return np.array([float(row[f"prob_{c}"]) for c in classes])


def render(table) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


def table_rows(text: str) -> dict[str, list[str]]:
    """A rendered rich table's body rows: first cell -> the other cells, stripped."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0]:
            rows[cells[0]] = cells[1:]
    return rows


class FakeBackend:
    """Deterministic probabilities from the mean pixel; optionally fails or sleeps; records concurrency."""

    def __init__(self, classes: list[str] = CLASSES, fail_when=None, sleep: float = 0.0) -> None:
        self.info = ModelInfo(name="fake", version="3", input_name="image", output_name="probabilities",
                              channels=1, size=8, max_batch_size=4, class_names=classes)
        self.fail_when, self.sleep = fail_when, sleep
        self.calls: list[int] = []
        self.active = self.max_active = 0
        self.lock = threading.Lock()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.calls.append(len(batch))
        try:
            time.sleep(self.sleep)
            if self.fail_when is not None and self.fail_when(batch):
                raise ServeError("inference on fake failed: server exploded")
            means = batch.reshape(len(batch), -1).mean(axis=1)
            k = len(self.info.class_names)
            logits = np.stack([means * (i + 1) * 10 for i in range(k)], axis=1)
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        finally:
            with self.lock:
                self.active -= 1

    def close(self) -> None:
        pass


def array_items(n: int, labels: bool = True) -> list[InputItem]:
    rng = np.random.default_rng(0)
    return [InputItem(f"npz:test:{i}", None, (i % 2) if labels else None,
                      rng.integers(0, 256, (8, 8), dtype=np.uint8)) for i in range(n)]


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """PNGs of two classes, the two DICOM test files, a corrupt '.png' (text) and an empty file."""
    root = tmp_path / "images"
    rng = np.random.default_rng(3)
    for cls, level in (("benign", 70), ("malignant", 180)):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            img = np.clip(rng.normal(level, 30, (36, 36)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / cls / f"{i}.png")
    shutil.copy(DATA / "CT_small.dcm", root / "malignant" / "ct.dcm")
    shutil.copy(DATA / "MR_small.dcm", root / "benign" / "mr.dcm")
    (root / "benign" / "corrupt.png").write_text("not a png at all")
    (root / "malignant" / "empty.png").write_bytes(b"")
    return root


# ---------------------------------------------------------------- metrics and helpers (fast)


def test_auroc_rank_formula_with_ties() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.4])
    # pairs (pos, neg): pos 0.35 beats 0.1 only; 0.8 beats all 3; 0.4 beats 0.1 and ties two 0.4s -> 1 + 2 * 0.5
    expected = (1 + 3 + 2) / 9
    assert auroc(y, np.stack([1 - p1, p1], axis=1)) == pytest.approx(expected)
    assert auroc(np.array([1, 1, 1]), np.array([[0.2, 0.8]] * 3)) is None
    y3 = np.array([0, 1, 2, 0, 1, 2])
    perfect = np.eye(3)[y3] * 0.8 + 0.1
    assert auroc(y3, perfect) == pytest.approx(1.0)
    reversed_ = 1.0 - perfect
    assert auroc(y3, reversed_) == pytest.approx(0.0)
    # a class without positives is left out of the macro mean: class 0 -> 3/4 pairs, class 2 -> 4/4, class 1 none
    y2 = np.array([0, 2, 0, 2])
    p = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.3, 0.6, 0.1], [0.5, 0.1, 0.4]])
    assert auroc(y2, p) == pytest.approx(np.mean([0.75, 1.0]))


def test_fake_backend_rows_metrics_and_concurrency(tmp_path: Path) -> None:
    backend = FakeBackend(sleep=0.05)
    items = array_items(20)
    out = tmp_path / "sub" / "pred.csv"
    summary = run_batch(items, backend, out, workers=2, in_flight=3, batch_size=2, progress=True)
    rows = read_rows(out)
    assert list(rows[0]) == csv_columns(CLASSES)
    assert sorted(r["key"] for r in rows) == sorted(i.key for i in items)
    assert sorted(backend.calls) == [2] * 10
    assert backend.max_active == 3  # requests overlap, never more than in_flight
    assert summary.done_now == 20 and summary.errors == 0 and summary.skipped == 0 and summary.requests == 10
    assert summary.labelled == 20 and summary.rows == 20
    y = np.array([CLASSES.index(r["label"]) for r in rows])
    p = np.array([probs_of(r, CLASSES) for r in rows])
    assert summary.accuracy == pytest.approx(np.mean(p.argmax(1) == y))
    assert summary.auroc == pytest.approx(auroc(y, p))
    assert all(r["model"] == "fake" and r["version"] == "3" and r["error"] == "" for r in rows)
    # no operating point: the decision is the arg-max class, and every row and the summary say so
    assert all(r["predicted"] == r["argmax"] == CLASSES[int(np.argmax(probs_of(r, CLASSES)))] for r in rows)
    assert {r["decision_rule"] for r in rows} == {"arg-max class (no operating point)"}
    assert summary.latency_ms["p50"] >= 50.0
    text = render(summary.table())
    assert "fake" in text and "processed now" in text
    shown = table_rows(text)
    assert shown["decision (CSV column predicted)"] == ["arg-max class (no operating point)"]
    assert shown["accuracy (arg-max class)"] == [f"{summary.accuracy:.4f}"]
    assert not any(name.startswith("sensitivity") for name in shown)  # no operating point, no sensitivity
    assert summary.as_dict()["done_now"] == 20 and isinstance(summary, BatchSummary)


def test_failed_requests_are_rows_and_redone_on_resume(tmp_path: Path) -> None:
    items = array_items(9)
    bad_key = items[4].key
    bad_mean = float(items[4].array.mean() / 255.0)
    backend = FakeBackend(fail_when=lambda b: np.any(np.isclose(b.reshape(len(b), -1).mean(1), bad_mean)))
    out = tmp_path / "pred.csv"
    summary = run_batch(items, backend, out, batch_size=3, progress=False)
    rows = {r["key"]: r for r in read_rows(out)}
    failed = [k for k, r in rows.items() if r["error"]]
    assert len(rows) == 9 and len(failed) == 3 and bad_key in failed  # the whole request of 3 failed
    assert all("server exploded" in rows[k]["error"] and rows[k]["predicted"] == "" for k in failed)
    assert summary.errors == 3 and summary.done_now == 9 and summary.requests == 2
    assert summary.labelled == 6  # failed rows carry no prediction

    fixed = FakeBackend()
    again = run_batch(items, fixed, out, batch_size=3, progress=False)
    rows2 = read_rows(out)
    assert again.skipped == 6 and again.done_now == 3 and again.errors == 0 and sorted(fixed.calls) == [3]
    assert sorted(r["key"] for r in rows2) == sorted(i.key for i in items) and not any(r["error"] for r in rows2)
    assert again.labelled == 9 and again.rows == 9


def test_resume_off_starts_afresh_and_other_model_is_refused(tmp_path: Path) -> None:
    items = array_items(4, labels=False)
    out = tmp_path / "pred.csv"
    run_batch(items, FakeBackend(), out, progress=False)
    summary = run_batch(items[:2], FakeBackend(), out, resume=False, progress=False)
    assert summary.skipped == 0 and summary.done_now == 2 and len(read_rows(out)) == 2
    assert summary.accuracy is None and summary.auroc is None and summary.labelled == 0
    with pytest.raises(ServeError, match="columns"):
        run_batch(items, FakeBackend(["a", "b", "c"]), out, progress=False)
    with pytest.raises(ServeError, match="not unique"):
        run_batch(items + items[:1], FakeBackend(), tmp_path / "dup.csv", progress=False)


BREAST = ["malignant", "normal_or_benign"]
# P(malignant) per image and its true class: the operating point 0.2 and the arg-max disagree on 0.401, 0.45 and 0.3
CASES = [(0.401, "malignant"), (0.15, "normal_or_benign"), (0.9, "malignant"), (0.3, "normal_or_benign"),
         (0.1, "malignant"), (0.45, "malignant")]


class OperatingPointBackend:
    """A binary model with an operating point, P(malignant) >= 0.2, answering each image with the probability
    coded in its pixels (value k: CASES[k]), to put images on either side of the threshold."""

    def __init__(self, version: str = "10", threshold: float = 0.2) -> None:
        self.info = ModelInfo(name="breastmnist", version=version, input_name="image", output_name="probabilities",
                              channels=1, size=8, max_batch_size=8, class_names=BREAST,
                              extra={"threshold": threshold, "positive_class": "malignant"})

    def infer(self, batch: np.ndarray) -> np.ndarray:
        p = np.array([CASES[int(round(float(image.mean()) * 255))][0] for image in batch])
        return np.stack([p, 1 - p], axis=1).astype(np.float32)

    def close(self) -> None:
        pass


def case_image(k: int) -> np.ndarray:
    """Mean intensity k / 255 (the case the stand-in backend looks up), one pixel brighter: not a blank image,
    which serving refuses."""
    image = np.full((8, 8), k, np.uint8)
    image[0, 0] = k + 1
    return image


def case_items() -> list[InputItem]:
    return [InputItem(f"npz:test:{k}", None, BREAST.index(label), case_image(k)) for k, (_, label) in enumerate(CASES)]


def test_predicted_is_the_decision_at_the_operating_point(tmp_path: Path) -> None:
    out = tmp_path / "pred.csv"
    summary = run_batch(case_items(), OperatingPointBackend(), out, progress=False)
    rows = read_rows(out)
    assert [r["predicted"] for r in rows] == ["malignant", "normal_or_benign", "malignant", "malignant",
                                              "normal_or_benign", "malignant"]
    assert [r["argmax"] for r in rows] == ["normal_or_benign", "normal_or_benign", "malignant", "normal_or_benign",
                                           "normal_or_benign", "normal_or_benign"]
    assert [r["predicted_index"] for r in rows] == ["0", "1", "0", "0", "1", "0"]
    assert {r["decision_rule"] for r in rows} == {"P(malignant) >= 0.2000"}
    # at the operating point: 4 of 6 right; malignant 3 of 4 found, normal 1 of 2 kept; the arg-max: 3 of 6
    assert summary.accuracy == pytest.approx(4 / 6) and summary.accuracy_argmax == pytest.approx(3 / 6)
    assert summary.sensitivity == pytest.approx(3 / 4) and summary.specificity == pytest.approx(1 / 2)
    shown = table_rows(render(summary.table()))
    assert shown["decision (CSV column predicted)"] == ["P(malignant) >= 0.2000"]
    assert shown["accuracy at P(malignant) >= 0.2000"] == ["0.6667"]
    assert shown["sensitivity for malignant at P(malignant) >= 0.2000"] == ["0.7500"]
    assert shown["specificity for malignant at P(malignant) >= 0.2000"] == ["0.5000"]
    assert shown["accuracy (arg-max class)"] == ["0.5000"]
    assert shown["AUROC (threshold-free)"] == ["0.7500"]  # 6 of the 8 (normal, malignant) pairs ranked right


def test_compare_with_run_compares_like_with_like(tmp_path: Path) -> None:
    summary = run_batch(case_items(), OperatingPointBackend(), tmp_path / "pred.csv", progress=False)
    run = write_run(tmp_path / "runs" / "r1", "completed", 0.8, 0.85, 1_000_000)
    record = json.loads(run.read_text())
    record["threshold"] = {"value": 0.2, "positive_class": "malignant",
                           "test": {"acc": 0.7, "sensitivity": 0.5, "specificity": 0.75}}
    run.write_text(json.dumps(record))
    text = render(compare_with_run(summary, run))
    shown = table_rows(text)
    assert shown["accuracy at P(malignant) >= 0.2000"] == ["0.6667", "0.7000", "-0.0333"]
    assert shown["sensitivity for malignant"] == ["0.7500", "0.5000", "+0.2500"]
    assert shown["specificity for malignant"] == ["0.5000", "0.7500", "-0.2500"]
    assert shown["accuracy (arg-max class)"] == ["0.5000", "0.8000", "-0.3000"]  # the run's acc is the arg-max's
    assert "AUROC (threshold-free)" in shown and "both at P(malignant) >= 0.2000" in text

    record["threshold"]["value"] = 0.35  # another operating point: its figures are not comparable
    run.write_text(json.dumps(record))
    text = render(compare_with_run(summary, run))
    assert table_rows(text)["accuracy at P(malignant) >= 0.2000"] == ["0.6667", "n/a", "n/a"]
    assert "P(malignant) >= 0.3500) is not the version's (P(malignant) >= 0.2000)" in " ".join(text.split())


def test_resume_refuses_rows_of_another_version_or_source_and_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    run_batch(case_items(), OperatingPointBackend("10"), out, progress=False, source="/data/a.npz split test")
    before = out.read_bytes()
    with pytest.raises(ServeError) as err:
        run_batch(case_items(), OperatingPointBackend("1"), out, progress=False, source="/data/a.npz split test")
    message = str(err.value)
    assert "breastmnist v10" in message and "breastmnist v1 " in message
    assert "--no-resume" in message and "--out" in message
    with pytest.raises(ServeError, match="from /data/a.npz split test, but .* on /data/b.npz split test"):
        run_batch(case_items(), OperatingPointBackend("10"), out, progress=False, source="/data/b.npz split test")
    assert out.read_bytes() == before  # nothing lost
    again = run_batch(case_items(), OperatingPointBackend("10"), out, progress=False, source="/data/a.npz split test")
    assert again.skipped == len(CASES) and again.done_now == 0 and again.version == "10"
    fresh = run_batch(case_items(), OperatingPointBackend("1"), out, resume=False, progress=False)
    assert fresh.done_now == len(CASES) and {r["version"] for r in read_rows(out)} == {"1"}


def write_run(folder: Path, status: str, acc: float, auc: float, mtime: float) -> Path:
    folder.mkdir(parents=True)
    record = {"schema": "medops.run/1", "run_id": folder.name, "status": status,
              "test": {"acc": acc, "auroc": auc, "loss": 0.5},
              "data": {"counts": {"test": [10, 30]}}}
    path = folder / "run.json"
    path.write_text(json.dumps(record))
    os.utime(path, (mtime, mtime))
    return path


def test_latest_run_and_compare(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    write_run(logs / "exp" / "runs" / "old", "completed", 0.8, 0.85, 1_000_000)
    write_run(logs / "exp" / "runs" / "new", "completed", 0.9, 0.95, 2_000_000)
    write_run(logs / "exp" / "runs" / "newest_failed", "running", 0.1, 0.1, 3_000_000)
    (logs / "broken").mkdir()
    (logs / "broken" / "run.json").write_text("{not json")
    assert latest_run(logs) == logs / "exp" / "runs" / "new"
    with pytest.raises(RunRecordError, match="no completed training run"):
        latest_run(logs / "exp" / "runs" / "newest_failed")
    summary = BatchSummary(total=40, done_now=40, skipped=0, errors=0, seconds=1.0, images_per_s=40.0,
                           latency_ms={"p50": 1.0, "p95": 2.0, "p99": 3.0}, accuracy=0.875, auroc=0.9, labelled=40)
    text = render(compare_with_run(summary, latest_run(logs)))
    assert "0.8750" in text and "0.9000" in text and "-0.0250" in text  # accuracy: batch, run, difference
    assert "0.9500" in text and "-0.0500" in text and "new" in text
    with pytest.raises(ServeError, match="not found"):
        compare_with_run(summary, tmp_path / "nowhere" / "run.json")


# ---------------------------------------------------------------- real Triton (slow)


@pytest.mark.slow
def test_folder_batch_over_triton_http_matches_local(served, image_folder: Path, tmp_path: Path) -> None:
    remote = TritonBackend(served.server.http_url, served.model)
    local = LocalBackend(served.repository, served.model)
    classes = remote.info.class_names
    items, info = iter_inputs(image_folder, class_names=classes)
    assert info["count"] == 10
    try:
        summary = run_batch(items, remote, tmp_path / "http.csv", workers=2, in_flight=2, batch_size=3,
                            progress=False)
        run_batch(items, local, tmp_path / "local.csv", batch_size=4, progress=False)
    finally:
        remote.close()
    rows = {r["key"]: r for r in read_rows(tmp_path / "http.csv")}
    local_rows = {r["key"]: r for r in read_rows(tmp_path / "local.csv")}
    assert len(rows) == 10 and set(rows) == {i.key for i in items}
    bad = {str(image_folder / "benign" / "corrupt.png"), str(image_folder / "malignant" / "empty.png")}
    for key, row in rows.items():
        if key in bad:
            assert row["error"].startswith(key + ":") and row["predicted"] == "" and row["prob_" + classes[0]] == ""
            continue
        assert row["error"] == "", row["error"]
        p = probs_of(row, classes)
        assert p.sum() == pytest.approx(1.0, abs=1e-5)
        assert np.max(np.abs(p - probs_of(local_rows[key], classes))) <= 1e-5
        threshold, positive = operating_point(served.repository)
        assert row["predicted"] == decided(p, classes, threshold, positive) and row["model"] == served.model
        assert row["argmax"] == classes[int(np.argmax(p))]
        assert row["decision_rule"] == f"P({positive}) >= {threshold:.4f}"
    assert summary.errors == 2 and summary.done_now == 10 and summary.skipped == 0
    assert summary.requests == 3  # 8 readable images in batches of 3
    lat = summary.latency_ms
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    assert summary.images_per_s > 0 and summary.seconds > 0


@pytest.mark.slow
def test_resume_after_interruption(served, breastmnist_small: Path, tmp_path: Path) -> None:
    remote = TritonBackend(served.server.http_url, served.model)
    items, _ = iter_inputs(breastmnist_small, split="val", class_names=remote.info.class_names)
    n = len(items := items[:24])
    out = tmp_path / "pred.csv"
    try:  # many small concurrent requests: tritonclient's HTTP client is not thread-safe, run_batch must cope
        first = run_batch(items, remote, out, in_flight=4, batch_size=2, progress=False)
        assert first.done_now == n and first.skipped == 0 and first.errors == 0 and first.requests == n // 2
        lines = out.read_text().splitlines(keepends=True)
        out.write_text("".join(lines[:4]) + lines[4][:25])  # header + 3 rows + a row cut mid-write
        second = run_batch(items, remote, out, in_flight=4, batch_size=2, progress=False)
    finally:
        remote.close()
    rows = read_rows(out)
    assert second.skipped == 3 and second.done_now == n - 3 and second.errors == 0
    keys = [r["key"] for r in rows]
    assert len(keys) == n and set(keys) == {i.key for i in items}
    assert out.read_text().count("key,path,label") == 1
    assert second.labelled == n and second.rows == n


@pytest.mark.slow
def test_npz_metrics_over_grpc_match_independent_computation(served, breastmnist_small: Path,
                                                              tmp_path: Path) -> None:
    remote = TritonBackend(served.server.grpc_url, served.model, protocol="grpc")
    classes = remote.info.class_names
    items, info = iter_inputs(breastmnist_small, split="test", class_names=classes)
    out = tmp_path / "grpc.csv"
    try:
        summary = run_batch(items, remote, out, workers=2, in_flight=3, batch_size=8, progress=False)
    finally:
        remote.close()
    assert summary.done_now == 64 and summary.errors == 0 and summary.labelled == 64
    rows = {r["key"]: r for r in read_rows(out)}
    truth = {i.key: i.label for i in items}
    y = np.array([truth[k] for k in rows])
    assert [classes.index(rows[k]["label"]) for k in rows] == y.tolist()
    p = np.array([probs_of(r, classes) for r in rows.values()])
    pos, neg = p[y == 1, 1], p[y == 0, 1]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    threshold, positive = operating_point(served.repository)
    at_op = np.array([classes.index(decided(row, classes, threshold, positive)) for row in p])
    assert summary.accuracy == pytest.approx(float(np.mean(at_op == y)), abs=1e-12)
    assert summary.accuracy_argmax == pytest.approx(float(np.mean(p.argmax(1) == y)), abs=1e-12)
    k = classes.index(positive)
    assert summary.sensitivity == pytest.approx(float(np.mean(at_op[y == k] == k)), abs=1e-12)
    assert summary.auroc == pytest.approx(pairs / (len(pos) * len(neg)), abs=1e-12)
    local = LocalBackend(served.repository, served.model)
    expected = local.infer(np.stack([np.asarray(i.array, np.float32).transpose(2, 0, 1) / 255.0 for i in items]))
    assert np.max(np.abs(p - expected[[int(k.split(":")[2]) for k in rows]])) <= 1e-5
    lat = summary.latency_ms
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    text = render(compare_with_run(summary, served.run_dir))
    record = json.loads((served.run_dir / "run.json").read_text())
    assert f"{record['test']['acc']:.4f}" in text and f"{summary.accuracy:.4f}" in text


def tiled_npz(source: Path, target: Path, copies: int) -> Path:
    """A MedMNIST .npz whose test split is ``copies`` times that of ``source`` (a long batch)."""
    data = np.load(source)
    np.savez(target, test_images=np.concatenate([data["test_images"]] * copies),
             test_labels=np.concatenate([data["test_labels"]] * copies))
    return target


@pytest.mark.slow
def test_server_killed_mid_batch_stops_the_run_and_a_rerun_resumes(served, breastmnist_small: Path,
                                                                    tmp_path: Path) -> None:
    """``serve batch`` against a Triton killed mid-run: exit 2 naming the URL within seconds, the rows written
    kept; the same command against a live server resumes them."""
    from serve.triton_server import TritonServer, free_port
    from tests.serve.test_predict import run_serve

    big = tiled_npz(breastmnist_small, tmp_path / "big.npz", 100)  # 6,400 images
    out = tmp_path / "out.csv"
    doomed = TritonServer(served.repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          model_control="explicit", load_models=[served.model]).start(timeout=120)
    try:
        args = ["batch", str(big), "--model", served.model, "--out", str(out), "--retries", "1", "--timeout", "5",
                "--batch-size", "1", "--in-flight", "1"]
        proc = subprocess.Popen([sys.executable, "-m", "serve", *args, "--url", doomed.http_url], cwd=REPO,
                                env={**os.environ, "COLUMNS": "250"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and len(out.read_bytes().splitlines()
                                                                          if out.exists() else []) < 50:
            time.sleep(0.05)
        assert proc.poll() is None, "the batch finished before the server was killed"
        os.killpg(doomed.process.pid, signal.SIGKILL)  # the server dies mid-batch
        killed = time.monotonic()
        stdout, stderr = proc.communicate(timeout=120)
        took = time.monotonic() - killed
    finally:
        doomed.stop()
    assert proc.returncode == 2, stdout + stderr
    assert took < 30, f"took {took:.1f} s after the kill"
    assert doomed.http_url in stderr and "stopped answering" in stderr and "rerun the same command" in stderr
    rows = read_rows(out)
    kept = [r for r in rows if not r["error"]]
    assert 50 <= len(kept) < 6400 and len(rows) - len(kept) <= 2  # no flood of error rows: it stopped at the 3rd
    again = run_serve(*args, "--url", served.server.http_url, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    shown = table_rows(again.stdout)
    assert shown["resumed (already in CSV)"] == [str(len(kept))]
    assert shown["processed now"] == [str(6400 - len(kept))] and shown["rows in CSV"] == ["6400"]


@pytest.mark.slow
def test_cli_folder_reports_skipped_types_and_empty_dicom_and_refuses_another_source(served, image_folder: Path,
                                                                                      tmp_path: Path) -> None:
    from tests.serve.test_predict import run_serve

    (image_folder / "benign" / "scan.nii").write_bytes(b"\0" * 352)
    (image_folder / "benign" / "scan.nii.gz").write_bytes(b"\x1f\x8b\x08\0")
    (image_folder / "malignant" / "blank.dcm").write_bytes(b"")
    out = tmp_path / "out.csv"
    common = ["--model", served.model, "--backend", "local", "--model-repository", str(served.repository),
              "--out", str(out)]
    first = run_serve("batch", str(image_folder), *common)
    assert first.returncode == 1, first.stdout + first.stderr  # the unreadable images
    assert "skipped 2 file(s) of types predict cannot read: .nii 1, .nii.gz 1" in first.stderr
    rows = read_rows(out)
    blank = next(r for r in rows if r["path"].endswith("blank.dcm"))
    assert len(rows) == 11 and blank["error"].endswith("blank.dcm: empty file (0 bytes)")
    (source,) = {r["source"] for r in rows}  # one input, named by a digest: a folder name can identify someone
    assert source.startswith("input ") and len(source) == 18 and image_folder.name not in source
    before = out.read_bytes()
    other = tmp_path / "other"
    shutil.copytree(image_folder / "benign", other)
    second = run_serve("batch", str(other), *common)
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"from {source}, but this run uses {served.model} v1 on input " in second.stderr
    assert "--no-resume" in second.stderr and "Traceback" not in second.stderr
    assert out.read_bytes() == before  # nothing lost


def test_multilabel_rows_resume_whatever_labels_they_hold(tmp_path: Path) -> None:
    """A multi-label row's `predicted` is a set (`a`, `a+b`, `(none)`): every one is complete, so a resume keeps
    them all instead of predicting them again; a set of labels has no single-class accuracy to report."""
    labels = ["a", "b", "c"]
    backend = FakeBackend(labels)
    backend.info.extra = {"metadata": {"input": {"task": "multilabel"},
                                       "operating_point": {"label_thresholds": {"a": 1e-4, "b": 0.007, "c": 0.9935}}}}
    items = array_items(6, labels=False)
    out = tmp_path / "labels.csv"
    first = run_batch(items, backend, out, progress=False)
    rows = read_rows(out)
    assert first.done_now == 6 and [r["predicted"] for r in rows] == ["(none)", "c", "a+b", "c", "a+b", "a+b"]
    assert {r["predicted_index"] for r in rows} == {""}
    again = run_batch(items, backend, out, progress=False)
    assert again.skipped == 6 and again.done_now == 0 and len(read_rows(out)) == 6
    assert again.accuracy is None and first.accuracy is None
