"""``python -m analysis.seeds``: the t-interval of the mean, and the real CLI at tiny size (2 seeds trained through
``python -m train -m``, then summed up; the same summary again from the folder)."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from analysis import seeds
from tests.conftest import FAST, REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_interval_of_the_mean_uses_students_t() -> None:
    values = [0.90, 0.92, 0.89, 0.91, 0.93]
    s = seeds.interval(values)
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    assert s["n"] == 5 and s["mean"] == pytest.approx(mean) and s["sd"] == pytest.approx(sd)
    assert s["t"] == pytest.approx(2.776445, abs=1e-5)  # t(0.975, 4 df)
    assert s["ci_low"] == pytest.approx(mean - 2.776445 * sd / math.sqrt(5), abs=1e-6)
    assert s["ci_high"] - s["mean"] == pytest.approx(s["mean"] - s["ci_low"])
    assert seeds.interval([0.5, 0.7], confidence=0.90)["t"] == pytest.approx(6.313752, abs=1e-5)  # t(0.95, 1 df)
    one = seeds.interval([0.8])
    assert one["mean"] == 0.8 and one["sd"] is None and one["ci_low"] is None


def test_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert seeds.main([str(tmp_path)]) == 2  # a folder without run.json
    assert "no run.json" in capsys.readouterr().err
    assert seeds.main(["experiment=breastmnist", "seed=3"]) == 2
    assert "seed=" in capsys.readouterr().err
    assert seeds.main(["not-an-override"]) == 2
    assert "neither a folder nor a Hydra override" in capsys.readouterr().err
    assert seeds.main(["experiment=breastmnist", "--seeds", "1"]) == 2


@pytest.mark.slow
def test_two_seeds_through_the_real_cli(tmp_path: Path, breastmnist_small: Path) -> None:
    out = tmp_path / "seeds"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    env.pop("WANDB_API_KEY", None)
    cmd = [sys.executable, "-m", "analysis.seeds", *FAST, f"data.path={breastmnist_small}", "data.md5=false",
           "trainer.max_epochs=1", "++trainer.limit_train_batches=2", "data.batch_size=32", "--seeds", "2",
           "--first-seed", "7", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    assert "seed=7,8" in proc.stdout and "test/auroc" in proc.stdout and "CI of the mean" in proc.stdout
    report = json.loads((out / "seeds.json").read_text())
    assert report["n_runs"] == 2 and sorted(r["seed"] for r in report["runs"]) == [7, 8]
    assert all(r["status"] == "completed" for r in report["runs"])
    auroc = report["metrics"]["test/auroc"]
    assert auroc["n"] == 2 and len(auroc["values"]) == 2
    assert auroc["ci_low"] <= auroc["mean"] <= auroc["ci_high"]
    assert auroc["half_width"] == pytest.approx(12.706205 * auroc["sd"] / math.sqrt(2), rel=1e-5)
    for name in ("val/auroc", "val/loss", "test/acc", "test/f1", "fit_seconds"):
        assert name in report["metrics"], name
    assert report["warnings"] == []  # the runs differ only in the seed, on one machine
    assert (out / "seeds.png").read_bytes()[:8] == PNG_SIGNATURE

    # the same summary from the folder, as JSON
    again = subprocess.run([sys.executable, "-m", "analysis.seeds", str(out), "--json"], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["metrics"]["test/auroc"]["mean"] == pytest.approx(auroc["mean"])
