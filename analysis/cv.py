"""``python -m analysis.cv <multirun folder>``: mean and sample std of the metrics of a cross-validation sweep.

Reads every ``run.json`` below the folder (the runs of ``python -m train -m experiment=breastmnist_cv`` or
any other sweep), prints a table of the val and test metrics over the runs (mean, sample standard deviation
with ddof=1, n) and writes it to ``<folder>/cv_summary.json``. Warns when the runs were trained on different
data (dataset fingerprints differ), when a fold repeats or is missing, or when a run did not complete.
Exit status: 0 on success, 2 when the folder holds no ``run.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from medops.run_record import RunRecordError, find_records, read_record

METRICS = ("auroc", "acc", "f1", "precision", "recall", "loss")
SPLITS = ("val", "test")
SUMMARY_FILE = "cv_summary.json"


def collect_runs(folder: str | Path) -> list[dict[str, Any]]:
    """The run records (``run.json``) found anywhere below ``folder``, ordered by fold then path.

    Each record gets a ``"run_json"`` key with the file it was read from. Unreadable files are skipped
    with a warning on stderr.
    """
    records = []
    for path in find_records(folder):
        try:
            record = dict(read_record(path).raw)
        except RunRecordError as exc:
            print(f"warning: skipping {exc}", file=sys.stderr)
            continue
        record["run_json"] = str(path)
        records.append(record)

    def order(r: dict[str, Any]) -> tuple[int, Any, str]:
        fold = _data(r).get("fold")
        return (0, fold, r["run_json"]) if isinstance(fold, int) else (1, 0, r["run_json"])

    return sorted(records, key=order)


def _data(record: dict[str, Any]) -> dict[str, Any]:
    data = record.get("data")
    return data if isinstance(data, dict) else {}


def _stats(values: Sequence[float]) -> dict[str, Any]:
    n = len(values)
    return {
        "mean": statistics.fmean(values) if n else None,
        "std": statistics.stdev(values) if n >= 2 else None,  # sample std (ddof=1); undefined for one run
        "n": n,
        "min": min(values) if n else None,
        "max": max(values) if n else None,
        "values": list(values),
    }


def aggregate(records: Iterable[dict[str, Any]], splits: Sequence[str] = SPLITS) -> dict[str, Any]:
    """Mean, sample std (ddof=1), n, min, max and values per ``<split>/<metric>`` over the runs.

    Returns ``{"n_runs", "runs": [...], "metrics": {"test/auroc": {...}, ...}, "folds", "num_folds",
    "fingerprints", "warnings": [...]}``. A metric missing (or not finite) in a run is left out of that
    metric's statistics, so its ``n`` is smaller than ``n_runs``.
    """
    records = list(records)
    metrics: dict[str, dict[str, Any]] = {}
    for split in splits:
        names = [m for m in METRICS if any(m in (r.get(split) or {}) for r in records)]
        names += sorted({k for r in records for k in (r.get(split) or {})} - set(names))
        for name in names:
            values = [(r.get(split) or {}).get(name) for r in records]
            finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
            metrics[f"{split}/{name}"] = _stats(finite)

    folds = [_data(r).get("fold") for r in records]
    fingerprints = sorted({str(_data(r).get("fingerprint")) for r in records})
    num_folds = sorted({_data(r).get("num_folds") for r in records if _data(r).get("fold") is not None})
    warnings: list[str] = []
    if len(fingerprints) > 1:
        warnings.append(f"the runs used different datasets: {len(fingerprints)} dataset fingerprints "
                        f"({', '.join(f[:23] for f in fingerprints)})")
    repeated = sorted(f for f, c in Counter(f for f in folds if f is not None).items() if c > 1)
    if repeated:
        warnings.append(f"folds {repeated} appear in more than one run")
    if any(f is None for f in folds):
        n = sum(f is None for f in folds)
        warnings.append(f"{n} of {len(folds)} runs have no fold (data.fold null): not a cross-validation run")
    if len(num_folds) > 1:
        warnings.append(f"the runs disagree on data.num_folds: {num_folds}")
    elif len(num_folds) == 1 and isinstance(num_folds[0], int):
        missing = sorted(set(range(num_folds[0])) - {f for f in folds if f is not None})
        if missing:
            warnings.append(f"folds {missing} of {num_folds[0]} have no run")
    seeds = {_data(r).get("fold_seed") for r in records if _data(r).get("fold") is not None}
    if len(seeds) > 1:
        warnings.append(f"the runs disagree on data.fold_seed: {sorted(seeds, key=str)} (different fold assignments)")
    unfinished = [r["run_json"] for r in records if r.get("status") != "completed"]
    if unfinished:
        warnings.append(f"{len(unfinished)} runs did not complete: {', '.join(unfinished)}")

    return {
        "n_runs": len(records),
        "runs": [
            {"run_json": r.get("run_json"), "run_id": r.get("run_id"), "status": r.get("status"),
             "fold": _data(r).get("fold"), "fingerprint": _data(r).get("fingerprint"),
             "split_fingerprint": _data(r).get("split_fingerprint")}
            for r in records
        ],
        "folds": folds,
        "num_folds": num_folds[0] if len(num_folds) == 1 else None,
        "fingerprints": fingerprints,
        "metrics": metrics,
        "warnings": warnings,
    }


def print_table(summary: dict[str, Any], console: Console | None = None, title: str = "") -> None:
    """The aggregated metrics as a rich table (mean ± sd, n, min, max), then the warnings."""
    console = console or Console()
    table = Table(title=title or f"cross-validation: {summary['n_runs']} runs (mean ± sample sd)")
    for col, justify in (("metric", "left"), ("mean", "right"), ("sd", "right"), ("n", "right"),
                         ("min", "right"), ("max", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    for name, s in summary["metrics"].items():
        table.add_row(name, fmt(s["mean"]), fmt(s["std"]), str(s["n"]), fmt(s["min"]), fmt(s["max"]))
    console.print(table)
    console.print(f"folds: {summary['folds']}  dataset: {', '.join(f[:23] for f in summary['fingerprints'])}",
                  soft_wrap=True)
    for w in summary["warnings"]:
        console.print(f"[bold yellow]warning:[/] {w}", soft_wrap=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.cv",
        description="Aggregate the run.json files of a cross-validation (or any) sweep: mean, sample std, n.",
    )
    parser.add_argument("folder", type=Path, help="a multirun folder, e.g. logs/breastmnist_cv/multiruns/<time>")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), help="splits to aggregate (default: val test)")
    parser.add_argument("--out", type=Path, default=None, help=f"summary file (default: <folder>/{SUMMARY_FILE})")
    args = parser.parse_args(argv)

    console = Console()
    if not args.folder.is_dir():
        print(f"error: {args.folder}: not a folder", file=sys.stderr)
        return 2
    records = collect_runs(args.folder)
    if not records:
        print(f"error: {args.folder}: no run.json found below it (not a folder of training runs)", file=sys.stderr)
        return 2
    summary = {"folder": str(args.folder.resolve()), **aggregate(records, splits=tuple(args.splits))}
    out = args.out or args.folder / SUMMARY_FILE
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print_table(summary, console, title=f"{args.folder}: {len(records)} runs (mean ± sample sd)")
    console.print(f"summary: {out}", soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
