"""``python -m bench training``'s pure parts: overrides and the summary of seeds (the real fits are checked by
tests/bench/test_bench.py on the shared quick run)."""

from __future__ import annotations

import pytest

from bench.time_to_accuracy import merged, summarise


def test_overrides_later_groups_win_per_key() -> None:
    assert merged(["a=1", "b=2"], ["a=3", "+c=4"]) == ["a=3", "b=2", "+c=4"]


def _run(seed: int, aurocs: list[float], fit: float) -> dict:
    curve = [{"epoch": i + 1, "seconds": 10.0 * (i + 1), "test_auroc": a, "test_acc": 0.5}
             for i, a in enumerate(aurocs)]
    return {"seed": seed, "fit_seconds": fit, "test_auroc": aurocs[-1], "test_acc": 0.8, "train_images_per_s": 100.0,
            "epochs": len(aurocs), "steps": 8 * len(aurocs), "batch_size": 64, "curve": curve}


def test_target_is_reached_where_the_seeds_mean_first_gets_there() -> None:
    # one seed alone crosses 0.90 at epoch 2, but the mean of the two only at epoch 3
    s = summarise([_run(1, [0.7, 0.95, 0.92], 30.0), _run(2, [0.7, 0.80, 0.90], 50.0)], 0.90)
    assert s["target_epoch"] == 3 and s["target_seconds"] == pytest.approx(30.0)
    assert s["fit_seconds"]["mean"] == pytest.approx(40.0) and s["fit_seconds"]["sd"] > 0
    assert [p["test_auroc"] for p in s["mean_curve"]] == pytest.approx([0.7, 0.875, 0.91])
    assert summarise([_run(1, [0.7, 0.8], 20.0)], 0.9)["target_epoch"] is None
