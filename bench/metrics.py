"""Case ``metrics``: time and peak memory of the evaluation metrics (:mod:`medops.metrics`) on many predictions.

Binary predictions (seeded: scores from two overlapping logistic distributions, rounded to 4 decimals so that many
scores tie, as real model outputs do) at each size of ``sizes`` (default 1e5 and 1e6). Each operation is timed
``repeats`` times (median, after one untimed call) and run once more under :mod:`tracemalloc` for its peak of
traced memory (numpy's array buffers included) above what was allocated before the call:

* ``auroc`` (:func:`medops.metrics.auroc`), ``auroc_or_none`` (what ``serve batch`` and the rollout report call),
  ``average_precision``, ``roc_curve`` (all thresholds), ``choose_threshold`` (Youden's operating point),
  ``summary_metrics`` (the run record's figures), ``evaluate_predictions`` with no bootstrap (every point figure
  of ``python -m evaluation.evaluate``), and one resample of the bootstrap interval of the AUROC (``bootstrap``
  rows: per resample; evaluation draws ``n_resamples`` of them per metric).

Before the rewrite of :func:`medops.metrics.roc_curve` (a thresholds x predictions boolean matrix), 40,000
predictions took 7 s and 3 GB there; the targets below are the issue's: the AUROC and every point figure of a
million predictions under 1 GiB and within seconds.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import common

OPERATIONS = ("auroc", "auroc_or_none", "average_precision", "roc_curve", "choose_threshold", "summary_metrics",
              "evaluate_predictions", "bootstrap")
MIB = 2.0**20


@dataclass
class MetricsConfig:
    sizes: list[int] = field(default_factory=lambda: [100_000, 1_000_000])
    repeats: int = 3
    bootstrap_resamples: int = 10  # the bootstrap row is per resample: its time / this
    threads: int = 1
    seed: int = 0

    @classmethod
    def quick(cls, threads: int) -> MetricsConfig:
        return cls(sizes=[2_000], repeats=1, bootstrap_resamples=10, threads=threads)


def predictions(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` binary predictions: (N x 2 probabilities, labels), about a third positive, AUROC about 0.9."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(np.int64)
    s = np.round(1.0 / (1.0 + np.exp(-(rng.normal(0.0, 1.0, n) + 1.3 * (2 * y - 1)))), 4)
    return np.c_[1.0 - s, s], y


def operations(P: np.ndarray, y: np.ndarray, resamples: int) -> dict[str, Callable[[], object]]:
    from medops import metrics

    def bootstrap() -> object:
        return metrics.bootstrap_ci(P, y, metrics.auroc, n_resamples=resamples, min_per_class=1)

    return {
        "auroc": lambda: metrics.auroc(P, y),
        "auroc_or_none": lambda: metrics.auroc_or_none(y, P),
        "average_precision": lambda: metrics.average_precision(P, y),
        "roc_curve": lambda: metrics.roc_curve(P[:, 1], y == 1),
        "choose_threshold": lambda: metrics.choose_threshold(P, y, "youden"),
        "summary_metrics": lambda: metrics.summary_metrics(P, y),
        "evaluate_predictions": lambda: metrics.evaluate_predictions(P, y, ["negative", "positive"], threshold=0.5,
                                                                     n_resamples=0),
        "bootstrap": bootstrap,
    }


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak traced memory of one call above what was traced when it started (its result included)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
        del result
    finally:
        tracemalloc.stop()
    return max(0, peak - base)


def measure(fn: Callable[[], object], repeats: int) -> dict[str, Any]:
    fn()  # untimed: imports and first-call costs
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"seconds": common.median(times), "seconds_runs": times, "peak_mib": peak_bytes(fn) / MIB}


def run(cfg: MetricsConfig, out_dir: Path, info: dict[str, Any],
        log: Callable[[str], None] = print) -> dict[str, Any]:
    started = time.perf_counter()
    rows = []
    for n in cfg.sizes:
        P, y = predictions(n, cfg.seed)
        for name, fn in operations(P, y, cfg.bootstrap_resamples).items():
            row = {"n": n, "operation": name, **measure(fn, cfg.repeats)}
            if name == "bootstrap":  # per resample
                row["seconds"] /= cfg.bootstrap_resamples
                row["seconds_runs"] = [t / cfg.bootstrap_resamples for t in row["seconds_runs"]]
            rows.append(row)
            log(f"metrics n={n} {name}: {row['seconds']:.4f} s, peak {row['peak_mib']:.2f} MiB")
    largest = max(cfg.sizes)
    at = {r["operation"]: r for r in rows if r["n"] == largest}
    point = [at[k] for k in OPERATIONS if k != "bootstrap"]
    targets = [
        common.target(f"AUROC (serve batch) of {largest:,} predictions: peak MiB", at["auroc_or_none"]["peak_mib"],
                      1024, higher_is_better=False, unit="MiB"),
        common.target(f"every point figure of {largest:,} predictions: largest peak MiB",
                      max(r["peak_mib"] for r in point), 1024, higher_is_better=False, unit="MiB"),
        common.target(f"every point figure of {largest:,} predictions: total seconds",
                      sum(r["seconds"] for r in point), 10, higher_is_better=False, unit="s"),
    ]
    return {**common.header("metrics", info, asdict(cfg)), "rows": rows, "targets": targets,
            "seconds": time.perf_counter() - started}


# -- table and chart (registered with bench.report when this module is imported) ---------------------------------
def metrics_table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    cfg = result["config"]
    table = Table(title=f"medops.metrics: median of {cfg['repeats']} runs; peak traced memory; bootstrap per resample")
    for col in ("predictions", "operation", "seconds", "peak MiB"):
        table.add_column(col, justify="left" if col == "operation" else "right")
    for r in result["rows"]:
        table.add_row(f"{r['n']:,}", r["operation"], f"{r['seconds']:.4f}", f"{r['peak_mib']:.2f}")
    return table


def metrics_chart(result: dict[str, Any], path: Path) -> Path:
    from bench import report

    sizes = result["config"]["sizes"]
    fig, axes = report._figure(2, width=7.0)
    for ax, key, label in ((axes[0], "seconds", "seconds"), (axes[1], "peak_mib", "peak MiB")):
        series = {f"{n:,}": [max(1e-6, next(r[key] for r in result["rows"] if r["n"] == n and r["operation"] == op))
                             for op in OPERATIONS] for n in sizes}
        report._bars(ax, [op.replace("_", "\n") for op in OPERATIONS], series, label, log=True)
        ax.tick_params(axis="x", labelsize=6)
    return report._save(fig, path, result["machine_line"])


def _register() -> None:
    from bench import report

    report.TABLES.setdefault("metrics", metrics_table)
    report.CHARTS.setdefault("metrics", metrics_chart)


_register()
