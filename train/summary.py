"""The end-of-run summary printed to the terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

METRICS = ("auroc", "acc", "precision", "recall", "f1", "loss")


def print_summary(record: dict[str, Any], console: Console | None = None) -> None:
    """A table of val and test metrics of the best checkpoint, then where everything was written."""
    console = console or Console()
    table = Table(title=f"run {record.get('run_id')} — best checkpoint", show_lines=False)
    table.add_column("metric")
    for split in ("val", "test"):
        table.add_column(split, justify="right")
    for name in METRICS:
        vals = [record.get(s, {}).get(name) for s in ("val", "test")]
        if any(v is not None for v in vals):
            table.add_row(name, *("-" if v is None else f"{v:.4f}" for v in vals))
    thr = record.get("threshold")
    if thr:
        positive = thr.get("positive_class", "class 1")
        for name in ("sensitivity", "specificity", "acc"):
            table.add_row(f"{name} @ P({positive}) >= {thr['value']:.3f}",
                          *(f"{thr[s][name]:.4f}" for s in ("val", "test")))
    console.print(table)
    cal = record.get("calibration") or {}
    if cal.get("temperature"):
        test = cal.get("test") or {}
        console.print(f"calibration: temperature {cal['temperature']:.3f} (fitted on val, exported); test ECE "
                      f"{test.get('ece_before', float('nan')):.3f} -> {test.get('ece_after', float('nan')):.3f}")
    data = record.get("data", {})
    timing = record.get("timing", {})
    console.print(f"data: {data.get('source')}  fingerprint {data.get('fingerprint', '')[:23]}…")
    console.print(f"epochs: {record.get('epochs')}  fit {timing.get('fit_seconds')} s, "
                  f"total {timing.get('total_seconds')} s  ({record.get('trainer', {}).get('precision')})")
    console.print(f"best checkpoint: {record.get('checkpoints', {}).get('best')}")
    plots = ", ".join(record.get("plots", {}).values())
    console.print(f"run record: {record.get('output_dir')}/run.json  plots: {plots}")
    wb = record.get("wandb")
    if wb and wb.get("sync_command"):
        console.print(f"W&B (offline): upload with `{wb['sync_command']}`")
    elif wb and wb.get("url"):
        console.print(f"W&B: {wb['url']}")
