"""Data validation: leakage, corrupt files, patient-level splits and the checks run before training."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datatools.validate_data import (
    _hamming_join,
    check_near_duplicates,
    dhash,
    hamming,
    near_hashes,
    pixel_hashes,
    popcount64,
    run_validation,
    summary,
    to_html,
    validate,
    validate_source,
    validation_settings,
)
from medops.datasets import SplitArrays
from tests.conftest import BREASTMNIST, FAST, REPO, run_cli, write_csv
from train.datamodules import FolderDataModule, MedMNISTDataModule


def _noise_png(path: Path, seed: int, size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(path)
    return path


def _split_csv(root: Path, leak: bool = False, extra: list[dict[str, str]] | None = None) -> Path:
    """4 noise PNGs per class and split; ``leak``: a copy of a train image listed in val."""
    rows = []
    seed = 0
    for split in ("train", "val", "test"):
        for label in ("a", "b"):
            for i in range(4):
                seed += 1
                p = _noise_png(root / split / label / f"{i}.png", seed)
                rows.append({"path": str(p.relative_to(root)), "label": label, "split": split})
    if leak:
        shutil.copy(root / "train" / "a" / "0.png", root / "val" / "a" / "leak.png")
        rows.append({"path": "val/a/leak.png", "label": "a", "split": "val"})
    return write_csv(root / "manifest.csv", rows + (extra or []))


def _validate_cli(*overrides: str, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "datatools.validate_data", f"hydra.run.dir={out}", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_real_breastmnist_has_cross_split_duplicates() -> None:
    report = run_validation(MedMNISTDataModule(str(BREASTMNIST)), {"allow_leakage": False})
    cross = report["duplicates"]["cross_split"]
    assert cross["groups"] >= 1  # train[115] == test[76] in the published file
    # independent check: identical pixel arrays across the published splits
    npz = np.load(BREASTMNIST)
    train = {npz["train_images"][i].tobytes() for i in range(len(npz["train_images"]))}
    others = [npz[f"{s}_images"][i].tobytes() for s in ("val", "test") for i in range(len(npz[f"{s}_images"]))]
    assert sum(b in train for b in others) >= cross["by_splits"].get("train/test", 0) >= 1
    assert any("leakage" in v for v in report["violations"])
    allowed = run_validation(MedMNISTDataModule(str(BREASTMNIST)), {"allow_leakage": True})
    assert not allowed["violations"] and any("leakage" in w for w in allowed["warnings"])
    assert set(allowed["intensity"]["per_split"]["train"]) == {"mean", "std", "p1", "p50", "p99"}
    assert allowed["counts"]["train"] == {"0": 147, "1": 399}


def test_crafted_leak_and_near_duplicate(tmp_path: Path) -> None:
    csv_path = _split_csv(tmp_path, leak=True)
    img = np.array(Image.open(tmp_path / "train" / "b" / "1.png")).astype(np.int16)
    img[0, 0] = (img[0, 0] + 1) % 256  # one pixel off: a near-duplicate, not an exact one
    Image.fromarray(img.astype(np.uint8)).save(tmp_path / "test" / "b" / "near.png")
    rows = (tmp_path / "manifest.csv").read_text() + "test/b/near.png,b,test\n"
    csv_path.write_text(rows)
    report, data = validate_source(FolderDataModule(str(csv_path), image_size=32), {})
    cross = report["duplicates"]["cross_split"]
    assert cross["groups"] == 1 and cross["by_splits"] == {"train/val": 1}
    assert any("leak.png" in p for p in cross["examples"][0]["images"])
    near = report["near_duplicates"]
    assert near["by_splits"] == {"train/test": 1} and near["pairs"] == near["confirmed"] == 1
    assert near["candidates"] >= 1 and near["candidates_by_splits"].get("train/test", 0) >= 1
    (pair,) = near["examples"]  # the exact copy (leak.png) is not listed again as a near-duplicate
    assert pair["a"].endswith("train/b/1.png") and pair["b"].endswith("test/b/near.png")
    assert pair["split_a"] == "train" and pair["split_b"] == "test" and pair["correlation"] > 0.99
    assert any("leakage" in v for v in report["violations"])
    assert any("1 near-duplicate pairs" in w for w in report["warnings"])
    assert not any("near-duplicate" in v for v in report["violations"])  # a warning unless near_duplicate_leakage
    page = to_html(report, data)
    assert page.count("<img ") == 1 and "data:image/png;base64," in page and "near.png" in page

    strict = run_validation(FolderDataModule(str(csv_path), image_size=32), {"near_duplicate_leakage": True})
    assert any("near-duplicate" in v for v in strict["violations"])
    off = run_validation(FolderDataModule(str(csv_path), image_size=32), {"near_duplicates": False})
    assert off["near_duplicates"]["skipped"] == "disabled" and "pairs" not in off["near_duplicates"]


def test_dhash_hamming() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (3, 28, 28, 1), dtype=np.uint8)
    h = dhash(a)
    d = hamming(h, h)
    assert h.dtype == np.uint64 and (np.diag(d) == 0).all() and d[0, 1] > 10
    # the classic dHash: bit = right box brighter than left box, 8 rows x 9 boxes of about 3 x 3 px
    grey = a[0, :, :, 0].astype(float)
    rows, cols = np.linspace(0, 28, 9), np.linspace(0, 28, 10)
    boxes = np.array([[grey[int(rows[r]):int(np.ceil(rows[r + 1])), int(cols[c]):int(np.ceil(cols[c + 1]))].mean()
                       for c in range(9)] for r in range(8)])
    assert int(h[0]) == int("".join("1" if b else "0" for b in (boxes[:, 1:] > boxes[:, :-1]).ravel()), 2)
    x = rng.integers(0, 2**63, 1000, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    assert popcount64(x).tolist() == [bin(int(v)).count("1") for v in x]
    # a copy shifted down by 1 px: its hash at offset (-1, 0) is close to the original's (edge rows aside)
    shifted = np.pad(a, ((0, 0), (1, 0), (0, 0), (0, 0)), mode="edge")[:, :28]
    original, probes = near_hashes(a, [(0, 0)])[0], near_hashes(shifted, [(0, 0), (-1, 0)])
    for o in (0, 1):  # horizontal, vertical
        assert (hamming(original[o], probes[1, o]).diagonal() <= 6).all()
        assert (hamming(original[o], probes[1, o]).diagonal() < hamming(original[o], probes[0, o]).diagonal()).all()


@pytest.mark.parametrize("clustered", [False, True])
def test_multi_index_hashing_finds_exactly_the_close_pairs(clustered: bool) -> None:
    """_hamming_join returns exactly the pairs an all-pairs comparison finds, once each, also when crowded buckets
    are split again (a tiny bucket cap) and for hashes clustered like real images (a few centres, few bits off)."""
    rng = np.random.default_rng(7)
    centres = rng.integers(0, 2**63, 4, dtype=np.int64).astype(np.uint64)

    def hashes(n: int) -> np.ndarray:
        if not clustered:
            return np.unique(rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) << np.uint64(1))
        flips = np.left_shift(np.uint64(1), rng.integers(0, 64, (n, 3)).astype(np.uint64))
        return np.unique(centres[rng.integers(0, 4, n)] ^ np.bitwise_xor.reduce(flips, axis=1))

    ha, hb = hashes(1500), hashes(900)
    brute = hamming(ha, hb)
    for thr in (0, 3, 6):
        want = set(zip(*np.nonzero(brute <= thr), strict=True))
        for cap in (None, 8):
            i, j = _hamming_join(ha, hb, thr, cap=cap)
            got = list(zip(i.tolist(), j.tolist(), strict=True))
            assert len(got) == len(set(got)) and set(got) == want, (thr, cap)
    assert len(want) > (1000 if clustered else -1)


ONE_PX = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _plant(src: np.ndarray, rng: np.random.Generator, sigma: float, shift: tuple[int, int]) -> np.ndarray:
    """A copy of an H x W x C uint8 image moved by ``shift`` px (edge pixels repeated) plus Gaussian noise."""
    dy, dx = shift
    padded = np.pad(src.astype(float), ((1, 1), (1, 1), (0, 0)), mode="edge")
    moved = padded[1 - dy:1 - dy + src.shape[0], 1 - dx:1 - dx + src.shape[1]]
    return np.clip(np.rint(moved + rng.normal(0, sigma, src.shape)), 0, 255).astype(np.uint8)


def _max_shift_correlation(x: np.ndarray) -> np.ndarray:
    """Reference: all-pairs Pearson correlation of N x H x W x 1 images, the best over shifts of up to 1 px."""
    h, w = x.shape[1:3]
    best = np.full((len(x), len(x)), -1.0)
    for dy, dx in [(0, 0), *ONE_PX]:
        a = x[:, max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)].reshape(len(x), -1).astype(float)
        b = x[:, max(0, -dy):h + min(0, -dy), max(0, -dx):w + min(0, -dx)].reshape(len(x), -1).astype(float)
        a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        best = np.maximum(best, a @ b.T)
    return best


def _chest_like(n: int, rng: np.random.Generator, size: int = 28) -> np.ndarray:
    """Distinct images of one anatomy (two dark lung fields in a bright body, each image its own shape, smooth
    variation and grain): different images correlate 0.83 (median) up to about 0.95, like real chest films."""
    from scipy.ndimage import gaussian_filter

    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    out = np.empty((n, size, size))
    for k in range(n):
        cx, cy, w, h, depth = rng.normal([0.3, 0.5, 0.12, 0.27, 70], [0.02, 0.03, 0.012, 0.025, 10])
        img = 120 + 70 * np.exp(-((xx - 0.5) / 0.45) ** 2) - 50 * yy
        for sx in (cx, 1 - cx + rng.normal(0, 0.015)):
            img -= depth * np.exp(-((xx - sx) / w) ** 2 - ((yy - cy) / h) ** 2)
        img += 8 * gaussian_filter(rng.normal(0, 1, (size, size)), 2.0) / 0.14 + rng.normal(0, 4, (size, size))
        out[k] = img * rng.normal(1, 0.05) + rng.normal(0, 5)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)[..., None]


def _planted_case(pool: np.ndarray, rng: np.random.Generator, n_planted: int = 40):
    """``pool`` (distinct images) split 70/15/15; copies of ``n_planted`` train images (noise sigma 3, 4 or 5 grey
    levels, every other one also moved by 1 px) added to val and test. The data and the planted pairs."""
    perm = rng.permutation(len(pool))
    cut = [int(0.7 * len(pool)), int(0.85 * len(pool))]
    images = {s: pool[idx] for s, idx in zip(("train", "val", "test"), np.split(perm, cut), strict=True)}
    planted, extra = set(), {"val": [], "test": []}
    for k, src in enumerate(rng.choice(len(images["train"]), n_planted, replace=False)):
        dest = ("val", "test")[k % 2]
        shift = ONE_PX[rng.integers(8)] if k % 4 >= 2 else (0, 0)
        extra[dest].append(_plant(images["train"][src], rng, (3, 4, 5)[k % 3], shift))
        planted.add(("train", int(src), dest, len(images[dest]) + len(extra[dest]) - 1))
    images.update({s: np.concatenate([images[s], np.array(extra[s])]) for s in extra})
    labels = {s: np.zeros(len(v), dtype=np.int64) for s, v in images.items()}
    return SplitArrays(images=images, labels=labels, class_names=["x"], source="planted"), planted


def _precision_recall(name: str, data: SplitArrays, planted: set) -> tuple[float, float, dict]:
    near = validate(data, [], {}, {"max_listed": 100_000})["near_duplicates"]
    confirmed = {(e["split_a"], e["index_a"], e["split_b"], e["index_b"]) for e in near["examples"]}
    assert len(confirmed) == near["confirmed"]
    recall, precision = len(planted & confirmed) / len(planted), len(planted & confirmed) / max(1, len(confirmed))
    print(f"{name}: {len(planted)} planted pairs, {near['candidates']} dHash candidates, {near['confirmed']} "
          f"confirmed (r >= {near['min_correlation']}): recall {recall:.3f}, precision {precision:.3f}")
    return recall, precision, near


def test_near_duplicates_planted_in_breastmnist_are_recovered() -> None:
    """Real ultrasound, similar anatomy: the BreastMNIST images with no other image at r >= 0.9 (the file has
    near-duplicates of its own) and 40 planted noisy / 1-px-shifted copies across splits."""
    npz = np.load(BREASTMNIST)
    x = np.concatenate([npz[f"{s}_images"] for s in ("train", "val", "test")])[..., None]
    corr = _max_shift_correlation(x)
    keep: list[int] = []
    for i in range(len(x)):
        if not keep or corr[i, keep].max() < 0.9:
            keep.append(i)
    assert len(keep) > 500
    data, planted = _planted_case(x[keep], np.random.default_rng(0))
    recall, precision, near = _precision_recall("BreastMNIST", data, planted)
    assert recall == 1.0 and precision >= 0.9
    assert near["candidates"] > 2 * len(planted)  # the hash alone flags similar anatomy too
    assert all(e["correlation"] < 0.95 for e in near["rejected_examples"])
    assert any(e["shift"] != [0, 0] for e in near["examples"])  # shifted copies are confirmed at their shift


def test_near_duplicates_planted_among_similar_anatomy() -> None:
    """The 28 px chest X-ray case: distinct images of one anatomy make the hash flag thousands of pairs; the
    pixel correlation keeps the planted copies and drops nearly all the rest."""
    rng = np.random.default_rng(1)
    data, planted = _planted_case(_chest_like(1000, rng), rng)
    recall, precision, near = _precision_recall("chest-like", data, planted)
    assert recall == 1.0 and precision >= 0.9
    assert near["candidates"] > 100 * len(planted)


def test_near_duplicates_of_the_real_breastmnist() -> None:
    """Candidates vs confirmed on the published file, each listed pair checked against the reference correlation;
    the known exact duplicate (train[115] = test[76]) is an exact, not a near, duplicate."""
    report = run_validation(MedMNISTDataModule(str(BREASTMNIST)), {"allow_leakage": True, "max_listed": 100_000})
    near = report["near_duplicates"]
    print(f"BreastMNIST as published: {near['candidates']} dHash candidates, {near['confirmed']} confirmed "
          f"{near['by_splits']}")
    assert 0 < near["confirmed"] < near["candidates"] and near["not_checked"] == 0
    npz = np.load(BREASTMNIST)
    x = {s: npz[f"{s}_images"][..., None] for s in ("train", "val", "test")}
    for e in near["examples"] + near["rejected_examples"]:
        pair = np.stack([x[e["split_a"]][e["index_a"]], x[e["split_b"]][e["index_b"]]])
        assert _max_shift_correlation(pair)[0, 1] == pytest.approx(e["correlation"], abs=1e-3)
    assert {(e["a"], e["b"]) for e in near["examples"]}.isdisjoint({("train[115]", "test[76]")})
    assert len(near["examples"]) == near["confirmed"] and all(e["correlation"] >= 0.95 for e in near["examples"])
    assert near["conflicting_labels"] == sum(e["labels"][0] != e["labels"][1] for e in near["examples"])


@pytest.mark.slow
def test_near_duplicate_check_of_500k_images_prints_its_time() -> None:
    """Benchmark (prints, no timing assert): 500,000 random 28 x 28 images in 80/10/10 splits with 100 planted
    copies; dHash + multi-index candidate search + correlation, the default settings."""
    import time

    rng = np.random.default_rng(0)
    sizes = {"train": 400_000, "val": 50_000, "test": 50_000}
    images = {s: rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8) for s, n in sizes.items()}
    planted = set()
    for k, src in enumerate(rng.choice(sizes["train"], 100, replace=False)):
        dest, j = ("val", "test")[k % 2], int(rng.integers(sizes["val"]))
        images[dest][j] = _plant(images["train"][src], rng, 5, ONE_PX[k % 8] if k % 4 >= 2 else (0, 0))
        planted.add(("train", int(src), dest, j))
    data = SplitArrays(images=images, labels={s: np.zeros(n, np.int64) for s, n in sizes.items()},
                       class_names=["x"], source="random")
    hashes = {s: pixel_hashes(images[s]) for s in sizes}
    ids = {s: [f"{s}[{i}]" for i in range(n)] for s, n in sizes.items()}
    start = time.perf_counter()
    near = check_near_duplicates(data, list(sizes), hashes, ids, validation_settings({"max_listed": 1000}), [])
    seconds = time.perf_counter() - start
    found = {(e["split_a"], e["index_a"], e["split_b"], e["index_b"]) for e in near["examples"]}
    print(f"near-duplicate check of {sum(sizes.values()):,} images: {seconds:.0f} s "
          f"({near['candidates']} candidates, {near['confirmed']} confirmed)")
    assert planted <= found and near["not_checked"] == 0


def test_corrupt_files_reported_and_cli_exit_codes(tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    root = tmp_path / "data"
    (root / "bad").mkdir(parents=True)
    (root / "bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "bad" / "empty.png").write_bytes(b"")
    ds = pydicom.dcmread(REPO / "tests" / "data" / "CT_small.dcm")
    del ds.PixelData
    ds.save_as(root / "bad" / "nopixels.dcm")
    from PIL import Image

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "bad" / "blank.png")  # nothing to classify
    names = ("broken.png", "empty.png", "nopixels.dcm", "blank.png")
    extra = [{"path": f"bad/{n}", "label": "a", "split": "train"} for n in names]
    csv_path = _split_csv(root, extra=extra)
    report = run_validation(FolderDataModule(str(csv_path), image_size=32), {})
    bad = {Path(f["path"]).name: f["reason"] for f in report["corrupt"]["files"]}
    assert set(bad) == set(names) and "empty" in bad["empty.png"]
    assert bad["blank.png"] == "blank image: every pixel has the value 0 (nothing to classify)"
    assert report["geometry"]["original_sizes"] == {"32x32x1": 24}

    out = tmp_path / "v1"
    proc = _validate_cli("data=folder", f"data.path={csv_path}", "data.image_size=32", out=out)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "nopixels.dcm" in proc.stdout and "broken.png" in proc.stdout
    saved = json.loads((out / "report.json").read_text())
    assert any(f["path"].endswith("nopixels.dcm") for f in saved["corrupt"]["files"])
    assert "nopixels.dcm" in (out / "report.md").read_text() and "nopixels.dcm" in (out / "report.html").read_text()

    out2 = tmp_path / "v2"
    proc = _validate_cli("data=folder", f"data.path={csv_path}", "data.image_size=32",
                         "data.validation.allow_corrupt=true", f"output_dir={out2 / 'reports'}", out=out2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out2 / "reports" / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_lfs_pointer_reported_as_unreadable(tmp_path: Path) -> None:
    csv_path = _split_csv(tmp_path)
    (tmp_path / "train" / "a" / "0.png").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123\n")
    report = run_validation(FolderDataModule(str(csv_path), image_size=32), {})
    (entry,) = report["corrupt"]["files"]
    assert entry["path"].endswith("0.png") and "LFS" in entry["reason"]


def test_patient_level_split(tmp_path: Path) -> None:
    rows = []
    for p in range(30):
        for k in range(3):
            path = _noise_png(tmp_path / f"p{p:02d}_{k}.png", p * 10 + k, size=16)
            rows.append({"path": path.name, "label": "pos" if p % 3 == 0 else "neg", "patient_id": f"P{p:02d}"})
    csv_path = write_csv(tmp_path / "manifest.csv", rows)
    dm = FolderDataModule(str(csv_path), image_size=16, val_fraction=0.2, test_fraction=0.2, split_seed=3)
    result = dm.scan()
    assert result.group_column == "patient_id" and not result.errors
    where: dict[str, set[str]] = {}
    for split, groups in result.groups.items():
        assert len(groups) > 0
        for g in groups:
            where.setdefault(g, set()).add(split)
    assert len(where) == 30 and all(len(s) == 1 for s in where.values())
    assert {len(result.groups[s]) for s in ("val", "test")} == {18}  # 6 patients x 3 images each
    report = run_validation(dm, {})
    assert report["patients"]["in_multiple_splits"] == 0 and not report["violations"]
    # seeded: the same assignment again; a sample-level split would mix patients
    again = FolderDataModule(str(csv_path), image_size=16, val_fraction=0.2, test_fraction=0.2, split_seed=3).scan()
    assert again.groups == result.groups
    mixed = FolderDataModule(str(csv_path), image_size=16, val_fraction=0.2, test_fraction=0.2, split_seed=3,
                             group_column=None).scan()
    flat = {}
    for split, paths in mixed.paths.items():
        for p in paths:
            flat.setdefault(Path(p).name.split("_")[0], set()).add(split)
    assert any(len(s) > 1 for s in flat.values())


def test_patient_in_two_given_splits_is_leakage(tmp_path: Path) -> None:
    rows = [{"path": _noise_png(tmp_path / f"{s}{i}.png", 100 * len(s) + i).name, "label": str(i % 2),
             "split": s, "study_id": "S1" if (s, i) in {("train", 0), ("test", 0)} else f"{s}{i}"}
            for s in ("train", "val", "test") for i in range(4)]
    dm = FolderDataModule(str(write_csv(tmp_path / "m.csv", rows)), image_size=32)
    report = run_validation(dm, {})
    assert report["patients"] == {"column": "study_id", "patients": 11, "in_multiple_splits": 1,
                                  "examples": [{"id": "S1", "splits": ["train", "test"]}]}
    assert any("study_id" in v for v in report["violations"])


def test_training_fails_on_leak_and_default_trains_with_record(tmp_path: Path) -> None:
    csv_path = _split_csv(tmp_path / "leaky", leak=True)
    proc = run_cli(*FAST, "debug=fdr", "data=folder", f"data.path={csv_path}", "data.image_size=32",
                   run_dir=tmp_path / "leak_run", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "leakage" in out and "leak.png" in out
    assert (tmp_path / "leak_run" / "data_validation.json").is_file()
    assert not (tmp_path / "leak_run" / "checkpoints").exists()

    run_dir = tmp_path / "fdr"
    run_cli("debug=fdr", "model=smallcnn", "model.net.width=8", "logger=csv", run_dir=run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed"
    dv = record["data_validation"]
    assert dv["enabled"] and dv["leakage_exact_duplicates"] >= 1 and dv["corrupt"] == 0 and not dv["violations"]
    assert "validation" not in record["config"]["data"]  # the data config stays instantiable (export)
    assert (run_dir / "data_validation.json").is_file()
    from datatools.data_version import fingerprint

    assert record["data"]["fingerprint"] == fingerprint(BREASTMNIST)


def _label_problem_csv(root: Path) -> Path:
    """``_split_csv`` (a, b: 4 per split) plus a case variant ``A`` (3 rows), ``NaN`` labels (2), a class ``rare``
    with one image, and a train image copied into train under label b (identical images, conflicting labels)."""
    extra = [{"path": str(_noise_png(root / "x" / f"A{i}.png", 100 + i).relative_to(root)), "label": "A",
              "split": s} for i, s in enumerate(("train", "val", "test"))]
    extra += [{"path": str(_noise_png(root / "x" / f"nan{i}.png", 200 + i).relative_to(root)), "label": "NaN",
               "split": "train"} for i in range(2)]
    extra += [{"path": str(_noise_png(root / "x" / "rare.png", 300).relative_to(root)), "label": "rare",
               "split": "train"}]
    csv_path = _split_csv(root, extra=extra)
    shutil.copy(root / "train" / "a" / "0.png", root / "x" / "copy_b.png")
    with csv_path.open("a") as fh:
        fh.write("x/copy_b.png,b,train\n")
    return csv_path


def test_label_problems_are_violations_naming_labels_counts_and_paths(tmp_path: Path) -> None:
    csv_path = _label_problem_csv(tmp_path)
    report = run_validation(FolderDataModule(str(csv_path), image_size=32), {})
    violations = [v for v in report["violations"] if v.startswith("labels:")]
    assert len(violations) == 5, report["violations"]
    case, nan = (next(v for v in violations if key in v) for key in ("case or whitespace", "missing value"))
    assert "'A' (3 images, e.g. " in case and "A0.png" in case and "'a' (12 images, e.g. " in case
    assert "'NaN' (2 images, e.g. " in nan and "nan0.png" in nan
    rare = next(v for v in violations if "class 'rare'" in v)
    assert "has 1 image (train 1, val 0, test 0" in rare and "rare.png" in rare and "fewer than 3" in rare
    assert any("class 'NaN' has 2 images" in v for v in violations)  # too few as well
    conflict = next(v for v in violations if "conflicting labels" in v)
    assert "1 group of identical images within train carry conflicting labels" in conflict
    assert "0.png (a)" in conflict and "copy_b.png (b)" in conflict
    assert all("data.validation.allow_label_issues=true" in v for v in violations)
    assert report["labels"]["spelling_variants"][0][0]["label"] == "A"
    assert report["duplicates"]["within_split"]["train"]["conflicting_labels"] == 1
    assert summary(report)["label_issues"] == {"spelling_variants": 1, "missing_like": 1, "too_few": 2}
    assert summary(report)["duplicates_within_conflicting"]["train"] == 1
    page = to_html(report)
    assert "label spelling variants" in page and "copy_b.png (b)" in page

    allowed = run_validation(FolderDataModule(str(csv_path), image_size=32), {"allow_label_issues": True})
    assert not allowed["violations"] and sum(w.startswith("labels:") for w in allowed["warnings"]) == 5


def test_declared_class_names_are_not_missing_values_and_clean_labels_pass(tmp_path: Path) -> None:
    root = tmp_path / "d"
    rows = [{"path": str(_noise_png(root / f"{label}{i}.png", 10 * k + i).relative_to(root)), "label": label,
             "split": ("train", "val", "test")[i % 3]}
            for k, label in enumerate(("none", "mild", "severe")) for i in range(6)]
    csv_path = write_csv(root / "m.csv", rows)
    undeclared = run_validation(FolderDataModule(str(csv_path), image_size=32), {})
    assert [e["label"] for e in undeclared["labels"]["missing_like"]] == ["none"]
    declared = run_validation(FolderDataModule(str(csv_path), image_size=32, class_names=["none", "mild", "severe"]),
                              {})
    assert declared["violations"] == [] and declared["labels"] == {"spelling_variants": [], "missing_like": [],
                                                                   "too_few": []}


def test_a_run_is_read_back_as_it_was_trained() -> None:
    """Evaluation and export rebuild a run's data from its record: the class order it trained with (an older run's
    names may sort differently today) and the unreadable files it left out."""
    from datatools.validate_data import run_data_arguments

    folder = {"_target_": "train.datamodules.FolderDataModule", "path": "m.csv", "class_names": None,
              "validation": {"allow_corrupt": True}}
    record = {"config": {"data": folder}, "data": {"class_names": ["tumor", "benign"]}}
    cfg = run_data_arguments(record)
    assert cfg["class_names"] == ["tumor", "benign"] and cfg["skip_unreadable"] is True and "validation" not in cfg
    declared = {**folder, "class_names": ["benign", "tumor"]}
    assert run_data_arguments({**record, "config": {"data": declared}})["class_names"] == ["benign", "tumor"]
    npz = {"_target_": "train.datamodules.MedMNISTDataModule", "path": "b.npz"}
    assert "class_names" not in run_data_arguments({**record, "config": {"data": npz}})
    assert run_data_arguments({"config": {}}) == {}
