"""The README's main job, end to end with small settings: train -> export run=latest -> Triton batch + comparison."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST, REPO, run_cli

pytestmark = pytest.mark.slow


def test_train_export_serve_chain(tmp_path: Path, breastmnist_small: Path) -> None:
    logs, repo = tmp_path / "logs", tmp_path / "model_repository"
    run_dir = logs / "breastmnist" / "runs" / "r1"
    run_cli(*FAST, f"data.path={breastmnist_small}", "data.md5=false", "trainer.max_epochs=2", f"paths.log_dir={logs}",
            run_dir=run_dir)
    export = subprocess.run([sys.executable, "-m", "export", "run=latest", "name=breastmnist", f"paths.log_dir={logs}",
                             f"model_repository={repo}", f"hydra.run.dir={tmp_path / 'export_log'}"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stdout[-2000:] + export.stderr[-2000:]
    out = tmp_path / "predictions.csv"
    batch = subprocess.run([sys.executable, "-m", "serve", "batch", str(breastmnist_small), "--start-server",
                            "--model", "breastmnist", "--model-repository", str(repo), "--compare-run", "latest",
                            "--log-dir", str(logs), "--out", str(out), "--no-resume"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    text = batch.stdout + batch.stderr
    assert batch.returncode == 0, text[-4000:]
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 64 and not any(r["error"] for r in rows)  # the whole test split, through Triton
    record = json.loads((run_dir / "run.json").read_text())
    correct = sum(r["argmax"] == r["label"] for r in rows)
    assert correct / len(rows) == pytest.approx(record["test"]["acc"], abs=1e-6)  # served == trained model
    (rule,) = {r["decision_rule"] for r in rows}  # the decision a clinician reads: the version's operating point
    threshold = float(rule.removeprefix("P(malignant) >= "))
    assert all(r["predicted"] == ("malignant" if float(r["prob_malignant"]) >= threshold else "normal_or_benign")
               for r in rows)
    assert f"{record['test']['acc']:.4f}" in text  # the comparison with the training run is printed
