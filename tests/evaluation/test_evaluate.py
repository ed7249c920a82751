"""Clinical evaluation: bootstrap intervals, calibration, operating point, subgroups and the CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, write_csv


@pytest.fixture
def trained_run(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the shared run: evaluation writes operating_point.json into the run folder."""
    import shutil as _shutil

    copy = tmp_path_factory.mktemp("evaluated") / "run"
    _shutil.copytree(trained_run, copy)
    return copy


def run_evaluate(*overrides: str, log_dir: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "evaluation.evaluate", f"hydra.run.dir={log_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def test_cli_on_trained_run(trained_run: Path, tmp_path: Path):
    out = tmp_path / "eval"
    proc = run_evaluate(f"run={trained_run}", f"output_dir={out}", "n_resamples=200", "calibrate=true",
                        log_dir=tmp_path / "log")
    assert "operating point" in proc.stdout
    result = json.loads((out / "evaluation.json").read_text())
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    # the calibration table says what each figure measures, next to the value a reader compares it with
    ece_row = next(r for r in html.split("<tr>") if r.startswith("<td>ece</td>"))
    assert f"<td>{result['calibration']['ece']:.3f}</td>" in ece_row and "top label (15 bins)" in ece_row
    assert "<figcaption>Calibration (reliability diagram and images per bin)</figcaption>" in html
    assert f"at the operating point, P(malignant) ≥ {result['operating_point']['threshold']:.4f};" in html
    op = json.loads((trained_run / "operating_point.json").read_text())
    assert op["chosen_on"] == "val" and op["threshold"] == result["operating_point"]["threshold"]
    assert op["temperature"] == pytest.approx(result["calibration"]["temperature"]) and op["temperature"] > 0
    # the validation threshold is applied unchanged to the test split
    with (out / "predictions_test.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    names = result["class_names"]
    # the finding is the positive class: the run's data declares malignant (class 0 of BreastMNIST)
    assert op["positive_class"] == "malignant" == names[op["positive_index"]] and op["positive_index"] == 0
    pos = op["positive_index"]
    p_pos = np.array([float(r[f"p_{names[pos]}"]) for r in rows])
    y = np.array([int(r["label"]) for r in rows])
    assert len(y) == result["evaluation"]["n"] == 64
    by_hand = (p_pos[y == pos] >= op["threshold"]).mean()
    assert result["evaluation"]["metrics"]["sensitivity"]["value"] == pytest.approx(by_hand)
    spec = (p_pos[y != pos] < op["threshold"]).mean()
    assert result["evaluation"]["metrics"]["specificity"]["value"] == pytest.approx(spec)
    for entry in result["evaluation"]["metrics"].values():
        if entry["ci_low"] is not None:
            assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]


def write_image_csv(tmp_path: Path, labels: list[str], sites: list[str], splits: list[str]) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i, (label, site, split) in enumerate(zip(labels, sites, splits, strict=True)):
        path = tmp_path / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(path)
        rows.append({"path": path.name, "label": label, "split": split, "site": site})
    return write_csv(tmp_path / "manifest.csv", rows)


def test_cli_external_csv_subgroups_and_unknown_class(trained_run: Path, tmp_path: Path):
    from export.source import load_source

    names = load_source(run=str(trained_run)).class_names
    labels = [names[0]] * 12 + [names[1]] * 12 + [names[1]] * 6 + [names[0], names[1]] * 3 + [names[0]]
    sites = ["A"] * 24 + ["B"] * 6 + [""] * 6 + ["C"]
    splits = ["test"] * 36 + ["train"]  # site C only outside the evaluated split: an empty subgroup
    manifest = write_image_csv(tmp_path, labels, sites, splits)
    out = tmp_path / "eval"
    run_evaluate(f"run={trained_run}", f"output_dir={out}", f"data={manifest}", "n_resamples=100",
                 "threshold.method=sensitivity", "threshold.target=0.9", log_dir=tmp_path / "log")
    result = json.loads((out / "evaluation.json").read_text())
    assert result["evaluation"]["n"] == 36 and result["operating_point"]["method"] == "sensitivity"
    site = result["subgroups"]["site"]
    assert site["C"]["n"] == 0 and "empty" in site["C"]["note"]
    assert "single class" in site["B"]["note"] and site["B"]["metrics"]["auroc"]["value"] is None
    assert site["(blank)"]["n"] == 6 and site["A"]["n"] == 24
    assert site["A"]["metrics"]["accuracy"]["gap"] is not None

    (tmp_path / "bad").mkdir()
    bad = write_image_csv(tmp_path / "bad", [names[0], "unicorn", names[1]], ["A", "A", "A"], ["test"] * 3)
    proc = run_evaluate(f"run={trained_run}", f"output_dir={tmp_path / 'bad_out'}", f"data={bad}",
                        log_dir=tmp_path / "log2", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "unicorn" in proc.stderr and "does not know" in proc.stderr
    assert not (tmp_path / "bad_out" / "evaluation.json").exists()


def test_evaluate_exported_onnx_model_and_log_to_wandb(tmp_path: Path, trained_run: Path) -> None:
    """`model=<exported dir>` evaluates through the ONNX graph and gives the checkpoint's figures; `wandb=on`
    writes an offline evaluation run whose summary holds the metrics."""
    import shutil as _shutil
    import subprocess as _subprocess
    import sys as _sys

    from hydra import compose, initialize_config_dir

    from export.build import export_model
    from tests.conftest import REPO
    from tests.wandb_log import final_summary

    run = tmp_path / "run"
    _shutil.copytree(trained_run, run)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="export", overrides=[f"run={run}", "name=m", f"model_repository={tmp_path / 'repo'}"])
    export_model(cfg)

    def evaluate(*args: str) -> dict:
        out = tmp_path / f"eval{len(list(tmp_path.glob('eval*')))}"
        proc = _subprocess.run([_sys.executable, "-m", "evaluation.evaluate", *args, f"output_dir={out}",
                                "n_resamples=100",
                                f"hydra.run.dir={out}/log"], cwd=REPO, capture_output=True, text=True, timeout=600,
                               env={**__import__("os").environ, "WANDB_MODE": "offline"})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return json.loads((out / "evaluation.json").read_text())

    from_ckpt = evaluate(f"run={run}", "wandb=off")
    from_onnx = evaluate(f"model={tmp_path / 'repo' / 'm'}", "wandb=on")
    for name in ("auroc", "accuracy"):
        assert from_onnx["evaluation"]["metrics"][name]["value"] == pytest.approx(
            from_ckpt["evaluation"]["metrics"][name]["value"], abs=1e-6)
    assert from_onnx["model"]["onnx"].endswith("m/1/model.onnx")
    (log_file,) = Path(from_onnx["wandb"]["dir"]).glob("run-*.wandb")
    summary = final_summary(log_file)
    assert summary["eval/auroc"] == pytest.approx(from_onnx["evaluation"]["metrics"]["auroc"]["value"])


def test_evaluate_external_class_folder(tmp_path: Path, trained_run: Path) -> None:
    """An external folder of class sub-folders (PNG files) is evaluated; labels come from the folder names."""
    import subprocess as _subprocess
    import sys as _sys

    from PIL import Image

    from tests.conftest import BREASTMNIST, REPO

    src = np.load(BREASTMNIST)
    names = ["malignant", "normal_or_benign"]
    for i in range(24):
        label = int(src["test_labels"][i, 0])
        (tmp_path / "ext" / names[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(src["test_images"][i]).save(tmp_path / "ext" / names[label] / f"{i}.png")
    out = tmp_path / "out"
    proc = _subprocess.run([_sys.executable, "-m", "evaluation.evaluate", f"run={trained_run}",
                            f"data={tmp_path / 'ext'}",
                            f"output_dir={out}", "n_resamples=50", "wandb=off", f"hydra.run.dir={out}/log"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "evaluation.json").read_text())
    assert result["data"]["n"] == 24 and result["data"]["external"]
    assert sum(map(sum, result["evaluation"]["confusion_matrix"])) == 24


def test_a_run_that_left_unreadable_files_out_is_evaluated_and_exported(tmp_path: Path) -> None:
    """``data.validation.allow_corrupt=true`` trains on the readable files; evaluation and export read the data the
    same way instead of refusing the run (or crashing) over the files training already left out."""
    from tests.conftest import FAST, run_cli

    labels = ["benign", "malignant"] * 20
    splits = ["train"] * 24 + ["val"] * 8 + ["test"] * 8
    manifest = write_image_csv(tmp_path, labels, ["A"] * 40, splits)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    with manifest.open("a") as fh:
        fh.write("broken.png,benign,test,A\n")
    run = tmp_path / "run"
    run_cli(*FAST, "data=folder", f"data.path={manifest}", "data.image_size=28", "data.positive_class=malignant",
            "data.validation.allow_corrupt=true", "trainer.max_epochs=1", run_dir=run)
    record = json.loads((run / "run.json").read_text())
    assert record["config"]["data"]["skip_unreadable"] is True
    # 8 validation images: no temperature is fitted on so few, and every stage says so
    why = "not calibrated: 8 validation images are too few to fit a temperature on (at least 30)"
    assert record["calibration"]["temperature"] is None and record["calibration"]["not_calibrated"] == why
    out = tmp_path / "eval"
    run_evaluate(f"run={run}", f"output_dir={out}", "n_resamples=20", log_dir=tmp_path / "log")
    assert json.loads((out / "evaluation.json").read_text())["evaluation"]["n"] == 8  # the broken file left out
    proc = subprocess.run([sys.executable, "-m", "export", f"run={run}", "name=m",
                           f"model_repository={tmp_path / 'repo'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and (tmp_path / "repo" / "m" / "1" / "model.onnx").is_file()
    card = (tmp_path / "repo" / "m" / "1" / "MODEL_CARD.md").read_text()
    assert f"Calibration: {why}; test ECE" in card and "- The served probabilities are not temperature-scaled" in card
