"""``python -m analysis.compare SOURCE...``: runs side by side, ranked by a metric, with curves and a report.

A SOURCE is a run folder (holding ``run.json``), a folder of runs (searched recursively for ``run.json``,
e.g. a multirun sweep folder) or a W&B project ``entity/project`` (read through ``wandb.Api()``; a string
is a W&B path only when no local path of that name exists). ``--group`` and ``--tag`` keep the runs of
one W&B group / with one tag (for local runs: ``logger.wandb.group`` and ``tags`` of their config).

Prints a table of the runs: the config keys whose values differ between them (nested keys flattened with
dots; paths, Hydra internals, logger folders and names and anything inside a run's own output folder are
left out), val metrics (of the best checkpoint) and test metrics, epochs and fit time, ranked by
``--metric`` (``--mode max``: highest first; the default mode is ``min`` for a loss, else ``max``), the
best marked with ★. Cross-validation runs (``data.fold`` set) that share everything else form a group
reported as mean ± sample std. Writes ``compare.png`` (learning curves of the metric's validation
counterpart, and test AUROC/accuracy/F1 per run or CV group with ±std error bars), ``compare.html`` (the
PNG embedded, and the table) and ``compare.json`` into ``--out`` (default: the first local source folder,
else ``./compare``).

``--best`` prints only the best run's folder (local) or ``entity/project/run_id`` (W&B), for scripts such
as ``python -m export run=$(python -m analysis.compare logs/train/multiruns/X --best) name=m``; it writes no
files unless ``--out`` is given. ``--json`` prints the ``compare.json`` content instead of the table.

Exit status 0, or 2 with a message on stderr for bad input: an unknown metric (the available ones are
listed), a folder without ``run.json``, a W&B project that cannot be read (no API key, offline, not
found, network), no runs at all. Runs trained on different datasets (fingerprints differ) get a warning.
"""

from __future__ import annotations

import argparse
import base64
import csv
import fnmatch
import html
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from medops.run_record import FILENAME as RUN_RECORD_FILE
from medops.run_record import RunRecordError, find_records, read_record

DEFAULT_METRIC = "test/auroc"
SPLITS = ("val", "test")
TABLE_METRICS = ("auroc", "acc", "f1", "loss")  # shown per split in the table (plus the ranking metric)
BAR_METRICS = ("auroc", "acc", "f1")  # the bar chart of test metrics
WANDB_TIMEOUT_S = 30
WANDB_PATH = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+")
# Config keys that say where a run wrote things or how it was named, not how it was trained.
IGNORED_KEYS = ("paths.*", "hydra.*", "logger.*.save_dir", "logger.*.dir", "logger.*.name", "logger.*.version",
                "logger.*.id", "_wandb*")
# Keys a W&B run's config has beyond the resolved Hydra config that run.json holds: the data summary, git
# and the LightningModule's own hyper-parameters (data-derived, or duplicates of ``model.*``).
WANDB_EXTRA_KEYS = {"data_summary", "git", "num_classes", "in_channels", "image_size", "mean", "std", "class_names",
                    "class_counts"}


class CompareError(Exception):
    """Bad input: reported as one line on stderr with exit status 2."""


@dataclass
class RunInfo:
    """One run, local or on W&B, in the form the comparison needs."""

    id: str
    name: str
    source: str  # the run folder, or ``entity/project/run_id``
    config: dict[str, Any]  # flattened with dots
    val: dict[str, float]
    test: dict[str, float]
    epochs: int | None
    fit_seconds: float | None
    fingerprint: str | None
    fold: int | None
    history: dict[str, list[float]]  # per-epoch values of val metrics, e.g. {"val/auroc": [...]}
    status: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- config


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and scalars are values, an empty dict stays a value."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _own_dir(run: RunInfo) -> str | None:
    out = run.config.get("paths.output_dir")
    if isinstance(out, str) and out:
        return out
    return run.source if Path(run.source).is_dir() else None


def _run_specific(key: str, runs: Sequence[RunInfo]) -> bool:
    """True when every run's value is a path inside its own output folder (checkpoint dirs, root dirs)."""
    seen = False
    for run in runs:
        if key not in run.config or run.config[key] is None:
            continue
        own, value = _own_dir(run), run.config[key]
        if not (own and isinstance(value, str) and own in value):
            return False
        seen = True
    return seen


def _ignored(key: str, runs: Sequence[RunInfo]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in IGNORED_KEYS) or _run_specific(key, runs)


def _all_keys(runs: Sequence[RunInfo]) -> list[str]:
    keys: dict[str, None] = {}
    for run in runs:
        keys.update(dict.fromkeys(run.config))
    return list(keys)


def differing_keys(runs: Sequence[RunInfo]) -> list[str]:
    """Flattened config keys whose values are not the same in every run (a missing key counts as a value),
    in config order, without paths, Hydra internals, logger folders/names and run-specific paths."""
    missing = object()
    out = []
    for key in _all_keys(runs):
        values = {_canonical(r.config[key]) if key in r.config else missing for r in runs}
        if len(values) > 1 and not _ignored(key, runs):
            out.append(key)
    return out


def _is_fold_key(key: str) -> bool:
    return key == "fold" or key.endswith(".fold")


def cv_groups(runs: Sequence[RunInfo]) -> list[list[RunInfo]]:
    """Cross-validation groups: runs with a fold whose configs agree on everything but the fold (and the
    ignored keys). Only groups of two or more runs are returned, in the order of their first run."""
    keys = [k for k in _all_keys(runs) if not _is_fold_key(k) and not _ignored(k, runs)]
    groups: dict[str, list[RunInfo]] = {}
    for run in runs:
        if run.fold is None:
            continue
        signature = _canonical([run.config.get(k, "<missing>") for k in keys])
        groups.setdefault(signature, []).append(run)
    return [g for g in groups.values() if len(g) > 1]


# ---------------------------------------------------------------------------------------------- metrics


def _split_metric(metric: str) -> tuple[str, str]:
    split, sep, name = metric.partition("/")
    if not sep or not name:
        raise CompareError(f"metric {metric!r} is not of the form <split>/<name>, e.g. test/auroc")
    return ("val" if split == "best_val" else split), name


def metric_value(run: RunInfo, metric: str) -> float | None:
    split, name = _split_metric(metric)
    values = run.val if split == "val" else run.test if split == "test" else {}
    value = values.get(name)
    if value is None or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def available_metrics(runs: Iterable[RunInfo]) -> list[str]:
    names: set[str] = set()
    for run in runs:
        names |= {f"val/{k}" for k in run.val} | {f"test/{k}" for k in run.test}
    return sorted(names)


def default_mode(metric: str) -> str:
    return "min" if "loss" in metric.rpartition("/")[2] else "max"


def rank(runs: Sequence[RunInfo], metric: str = DEFAULT_METRIC, mode: str = "max") -> list[RunInfo]:
    """The runs best first by ``metric`` (``mode`` max: highest first); runs without the metric go last."""
    if mode not in ("max", "min"):
        raise CompareError(f"mode must be max or min, not {mode!r}")
    sign = -1.0 if mode == "max" else 1.0

    def key(run: RunInfo) -> tuple[int, float]:
        value = metric_value(run, metric)
        return (1, 0.0) if value is None else (0, sign * value)

    return sorted(runs, key=key)  # stable: ties keep the order the runs were found in


def val_counterpart(metric: str) -> str:
    """The per-epoch validation metric behind ``metric``: test/auroc -> val/auroc."""
    return f"val/{_split_metric(metric)[1]}"


# ----------------------------------------------------------------------------------------- local runs


def _read_history(run_dir: Path) -> dict[str, list[float]]:
    """Per-epoch ``val/*`` values from the run's CSV log (the last value wins when an epoch repeats)."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        found = sorted(run_dir.glob("csv/**/metrics.csv"))
        if not found:
            return {}
        path = found[0]
    by_key: dict[str, dict[int, float]] = {}
    try:
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                epoch = row.get("epoch")
                if not epoch:
                    continue
                for key, value in row.items():
                    if key and key.startswith("val/") and value not in (None, ""):
                        by_key.setdefault(key, {})[int(float(epoch))] = float(value)
    except (OSError, ValueError, csv.Error) as exc:
        print(f"warning: {path}: unreadable per-epoch metrics ({exc}); no learning curve", file=sys.stderr)
        return {}
    return {k: [v[e] for e in sorted(v)] for k, v in by_key.items()}


def _numbers(d: Any) -> dict[str, float]:
    if not isinstance(d, dict):
        return {}
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _local_run(run_json: Path, root: Path) -> RunInfo:
    try:
        record = read_record(run_json).raw
    except RunRecordError as exc:
        raise CompareError(str(exc)) from None
    if not isinstance(record.get("config"), dict):
        raise CompareError(f"{run_json}: not a medops run record (no config)")
    run_dir = run_json.parent
    data = record.get("data") if isinstance(record.get("data"), dict) else {}
    config = flatten(record["config"])
    fold = data.get("fold", config.get("data.fold"))
    try:
        name = str(run_dir.relative_to(root)) if run_dir != root else run_dir.name
    except ValueError:
        name = run_dir.name
    tags = config.get("tags") if isinstance(config.get("tags"), list) else []
    return RunInfo(
        id=str(record.get("run_id") or run_dir.name),
        name=name if name != "." else run_dir.name,
        source=str(run_dir),
        config=config,
        val=_numbers(record.get("val")),
        test=_numbers(record.get("test")),
        epochs=record.get("epochs"),
        fit_seconds=(record.get("timing") or {}).get("fit_seconds"),
        fingerprint=data.get("fingerprint"),
        fold=fold if isinstance(fold, int) and not isinstance(fold, bool) else None,
        history=_read_history(run_dir),
        status=record.get("status"),
        group=config.get("logger.wandb.group"),
        tags=[str(t) for t in tags],
    )


def load_local_runs(paths: Iterable[str | Path]) -> list[RunInfo]:
    """The runs in run folders and folders of runs (``run.json`` anywhere below), each folder once."""
    runs: list[RunInfo] = []
    seen: set[Path] = set()
    for given in paths:
        path = Path(given)
        if path.is_file() and path.name == RUN_RECORD_FILE:
            path = path.parent
        if not path.is_dir():
            raise CompareError(f"{path}: no such run folder")
        found = find_records(path)
        if not found:
            raise CompareError(f"{path}: no run.json found (not a run folder, nor a folder of runs)")
        for run_json in found:
            key = run_json.resolve()
            if key not in seen:
                seen.add(key)
                runs.append(_local_run(run_json, path))
    return runs


# ------------------------------------------------------------------------------------------- W&B runs


def _wandb_offline_reason() -> str | None:
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled") and not os.environ.get("WANDB_API_KEY"):
        return (f"W&B is offline (WANDB_MODE={mode}) and no WANDB_API_KEY is set; set WANDB_API_KEY (or run "
                "`wandb login` and unset WANDB_MODE) to read runs from the W&B server, or compare local run folders")
    return None


def _wandb_config(raw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(flattened training config as in run.json, the data summary) of a W&B run's config."""
    raw = dict(raw or {})
    summary = raw.get("data_summary") if isinstance(raw.get("data_summary"), dict) else {}
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    config = {k: v for k, v in raw.items()
              if k and not k.startswith("_") and k not in WANDB_EXTRA_KEYS and not (k in model and k != "model")}
    return flatten(config), summary


def _summary(run: Any) -> dict[str, Any]:
    summary = getattr(run, "summary_metrics", None)
    if summary is None:
        summary = getattr(run, "summary", None) or {}
        summary = getattr(summary, "_json_dict", summary)
    return dict(summary)


def _wandb_history(run: Any, key: str) -> list[float]:
    rows = [r for r in run.scan_history(keys=[key]) if isinstance(r.get(key), (int, float))]
    rows.sort(key=lambda r: (r.get("_step") if isinstance(r.get("_step"), (int, float)) else 0))
    return [float(r[key]) for r in rows]


def _wandb_run(run: Any, project_path: str, history_key: str) -> RunInfo:
    config, data = _wandb_config(run.config)
    summary = _summary(run)
    test = {k.split("/", 1)[1]: v for k, v in _numbers(summary).items() if k.count("/") == 1 and k.startswith("test/")}
    val = {k.split("/", 1)[1]: v for k, v in _numbers(summary).items()
           if k.count("/") == 1 and k.startswith("best_val/")}
    if not val:  # no evaluation of the best checkpoint: the last epoch's validation metrics
        val = {k.split("/", 1)[1]: v for k, v in _numbers(summary).items()
               if k.count("/") == 1 and k.startswith("val/")}
    epoch = summary.get("epoch")
    fit = summary.get("timing/fit_seconds")
    fold = data.get("fold", config.get("data.fold"))
    return RunInfo(
        id=str(run.id),
        name=str(getattr(run, "name", None) or run.id),
        source=f"{project_path}/{run.id}",
        config=config,
        val=val,
        test=test,
        epochs=int(epoch) + 1 if isinstance(epoch, (int, float)) else None,  # 0-based epoch index logged
        fit_seconds=float(fit) if isinstance(fit, (int, float)) else None,
        fingerprint=data.get("fingerprint"),
        fold=fold if isinstance(fold, int) and not isinstance(fold, bool) else None,
        history={history_key: _wandb_history(run, history_key)},
        status=getattr(run, "state", None),
        group=getattr(run, "group", None),
        tags=[str(t) for t in (getattr(run, "tags", None) or [])],
    )


def load_wandb_runs(path: str, group: str | None = None, tag: str | None = None, api: Any = None, *,
                    metric: str = DEFAULT_METRIC, timeout: int = WANDB_TIMEOUT_S) -> list[RunInfo]:
    """The runs of W&B project ``entity/project`` (optionally one group / one tag) with their config,
    summary metrics and the per-epoch history of ``metric``'s validation counterpart.

    ``api`` is a ``wandb.Api``-like object; by default ``wandb.Api(timeout=timeout)`` is made. Any failure
    to reach or read the project becomes a :class:`CompareError` saying what went wrong.
    """
    if not WANDB_PATH.fullmatch(path):
        raise CompareError(f"{path!r} is not a W&B project path of the form entity/project")
    history_key = val_counterpart(metric)
    filters: dict[str, Any] = {}
    if group is not None:
        filters["group"] = group
    if tag is not None:
        filters["tags"] = {"$in": [tag]}
    where = f"W&B project {path}" + (f" (group={group})" if group else "") + (f" (tag={tag})" if tag else "")
    try:
        if api is None:
            reason = _wandb_offline_reason()
            if reason:
                raise CompareError(f"cannot read {where}: {reason}")
            import wandb

            api = wandb.Api(timeout=timeout)
        found = list(api.runs(path, filters=filters or None))
        found = [r for r in found if (group is None or getattr(r, "group", None) == group)
                 and (tag is None or tag in (getattr(r, "tags", None) or []))]
        runs = [_wandb_run(r, path, history_key) for r in found]
    except CompareError:
        raise
    except Exception as exc:  # wandb raises CommError, UsageError, AuthenticationError, ValueError, requests errors
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else "no details"
        hint = ""
        if "wandb login" not in message and ("api key" in message.lower() or type(exc).__name__ == "UsageError"):
            hint = " (no W&B API key: set WANDB_API_KEY or run `wandb login`)"
        raise CompareError(f"cannot read {where}: {type(exc).__name__}: {message}{hint}") from None
    if not runs:
        raise CompareError(f"no runs found in {where}")
    return runs


def is_wandb_path(source: str) -> bool:
    """An ``entity/project`` string that is not an existing local path."""
    return not Path(source).exists() and WANDB_PATH.fullmatch(source) is not None


# ------------------------------------------------------------------------------------------ reporting


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}" if digits else f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _config_cell(run: RunInfo, key: str) -> str:
    if key not in run.config:
        return "—"
    value = run.config[key]
    return f"{value:g}" if isinstance(value, float) else _fmt(value)


def _table_metrics(metric: str) -> list[str]:
    split, name = _split_metric(metric)
    cols = [f"{s}/{m}" for s in SPLITS for m in TABLE_METRICS]
    if f"{split}/{name}" not in cols:
        cols.insert(0, f"{split}/{name}")
    return cols


def _group_label(group: list[RunInfo], keys: list[str]) -> str:
    shown = [k for k in keys if not _is_fold_key(k)]
    parts = [f"{k}={_config_cell(group[0], k)}" for k in shown]
    return f"CV {len(group)} folds" + (f" ({', '.join(parts)})" if parts else "")


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def group_summaries(runs: Sequence[RunInfo], keys: list[str]) -> list[dict[str, Any]]:
    out = []
    for group in cv_groups(runs):
        entry: dict[str, Any] = {"label": _group_label(group, keys), "runs": [r.source for r in group],
                                 "folds": [r.fold for r in group], "mean": {}, "std": {}}
        for split in SPLITS:
            names = sorted({n for r in group for n in getattr(r, split)})
            for name in names:
                values = [v for r in group if (v := getattr(r, split).get(name)) is not None and not math.isnan(v)]
                mean, std = _mean_std(values)
                entry["mean"][f"{split}/{name}"], entry["std"][f"{split}/{name}"] = mean, std
        out.append(entry)
    return out


def fingerprint_warning(runs: Sequence[RunInfo]) -> str | None:
    prints: dict[str, list[str]] = {}
    for run in runs:
        if run.fingerprint:
            prints.setdefault(run.fingerprint, []).append(run.name)
    if len(prints) < 2:
        return None
    parts = "; ".join(f"{fp[:19]}…: {', '.join(names)}" for fp, names in prints.items())
    return f"the runs were trained on different datasets (fingerprints differ), so they are not comparable: {parts}"


def build_report(ranked: Sequence[RunInfo], metric: str, mode: str) -> dict[str, Any]:
    keys = differing_keys(ranked)
    rows = []
    for i, run in enumerate(ranked):
        rows.append({
            "rank": i + 1, "best": i == 0 and metric_value(run, metric) is not None,
            "id": run.id, "name": run.name, "source": run.source, "value": metric_value(run, metric),
            "config": {k: run.config.get(k) for k in keys}, "val": run.val, "test": run.test,
            "epochs": run.epochs, "fit_seconds": run.fit_seconds, "fingerprint": run.fingerprint,
            "fold": run.fold, "status": run.status, "group": run.group, "tags": run.tags,
        })
    warning = fingerprint_warning(ranked)
    return {
        "metric": metric, "mode": mode, "best": rows[0]["source"] if rows and rows[0]["best"] else None,
        "differing_keys": keys, "table_metrics": _table_metrics(metric), "rows": rows,
        "groups": group_summaries(ranked, keys), "warnings": [warning] if warning else [],
    }


def _short_label(run: RunInfo, keys: list[str], width: int = 48) -> str:
    parts = [f"{k.rsplit('.', 1)[-1]}={_config_cell(run, k)}" for k in keys]
    label = f"{run.name}" + (f" ({', '.join(parts)})" if parts else "")
    return label if len(label) <= width else label[: width - 1] + "…"


def plot_learning_curves(ax: Any, runs: Sequence[RunInfo], keys: list[str], curve_key: str) -> None:
    """The per-epoch ``curve_key`` of each run on ``ax`` (the best run bold and starred)."""
    from matplotlib.ticker import MaxNLocator

    drew = False
    for i, run in enumerate(runs):
        values = run.history.get(curve_key) or []
        if values:
            ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3,
                    linewidth=2.6 if i == 0 else 1.3, label=("★ " if i == 0 else "") + _short_label(run, keys))
            drew = True
    ax.set_title(f"{curve_key} per epoch")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(curve_key)
    ax.grid(alpha=0.3)
    if drew:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, f"no per-epoch {curve_key} recorded", ha="center", va="center", transform=ax.transAxes)


_BarEntry = tuple[str, dict[str, float | None], dict[str, float | None]]


def _bar_entries(runs: Sequence[RunInfo], keys: list[str], groups: list[list[RunInfo]]) -> list[_BarEntry]:
    """(label, test values, std) per bar group: one per run, or per cross-validation group (at the place of its
    best fold) with the mean and sample std over its folds."""
    member = {id(r): g for g in groups for r in g}
    entries: list[_BarEntry] = []
    done: set[int] = set()
    for run in runs:
        group = member.get(id(run))
        if group is None:
            entries.append((_short_label(run, keys, 28), {m: run.test.get(m) for m in BAR_METRICS}, {}))
        elif id(group) not in done:
            done.add(id(group))
            means, stds = {}, {}
            for m in BAR_METRICS:
                means[m], stds[m] = _mean_std([r.test[m] for r in group if r.test.get(m) is not None])
            parts = [f"{k.rsplit('.', 1)[-1]}={_config_cell(group[0], k)}" for k in keys if not _is_fold_key(k)]
            label = f"CV {len(group)} folds" + (f"\n{', '.join(parts)}" if parts else "")
            entries.append((label if len(label) <= 48 else label[:47] + "…", means, stds))
    return entries


def plot_test_bars(ax: Any, runs: Sequence[RunInfo], keys: list[str]) -> None:
    """Test AUROC/accuracy/F1 bars on ``ax`` per run or CV group (mean ± sample std)."""
    import numpy as np

    groups = cv_groups(runs)
    entries = _bar_entries(runs, keys, groups)
    x = np.arange(len(entries))
    width = 0.8 / len(BAR_METRICS)
    for j, m in enumerate(BAR_METRICS):
        heights = [e[1].get(m) if e[1].get(m) is not None else 0.0 for e in entries]
        errors = [e[2][m] if e[2].get(m) is not None else float("nan") for e in entries]  # nan: no error bar
        ax.bar(x + (j - (len(BAR_METRICS) - 1) / 2) * width, heights, width, label=f"test/{m}",
               yerr=errors if groups else None, capsize=3)
    tilt = len(entries) > 3
    ax.set_xticks(x, [e[0] for e in entries], rotation=20 if tilt else 0, ha="right" if tilt else "center",
                  fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_title("test metrics" + (" (CV groups: mean ± std)" if groups else ""))
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def plot(runs: Sequence[RunInfo], metric: str, out_dir: str | Path) -> Path:
    """``compare.png`` in ``out_dir``: learning curves of ``metric``'s validation counterpart per run, and
    test AUROC/accuracy/F1 per run (CV groups: mean ± sample std). ``runs`` best first (see :func:`rank`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = differing_keys(runs)
    fig, (ax_curve, ax_bar) = plt.subplots(1, 2, figsize=(14, 5.2))
    plot_learning_curves(ax_curve, runs, keys, val_counterpart(metric))
    plot_test_bars(ax_bar, runs, keys)
    fig.tight_layout()
    path = out_dir / "compare.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _header(report: dict[str, Any]) -> list[str]:
    return ["", "run", *report["differing_keys"], *report["table_metrics"], "epochs", "fit s"]


def _cells(report: dict[str, Any], row: dict[str, Any]) -> list[str]:
    metrics = []
    for col in report["table_metrics"]:
        split, name = col.split("/", 1)
        metrics.append(_fmt(row[split].get(name)))
    status = "" if row["status"] in (None, "completed", "finished") else f" [{row['status']}]"
    return ["★" if row["best"] else "", f"{row['name']}{status}", *row["config_cells"], *metrics,
            _fmt(row["epochs"]), _fmt(row["fit_seconds"], 1)]


def print_table(report: dict[str, Any], runs: Sequence[RunInfo], console: Console | None = None) -> None:
    if console is None:
        console = Console() if sys.stdout.isatty() else Console(width=max(100, 24 * (len(_header(report)) + 2)))
    title = f"{len(runs)} runs ranked by {report['metric']} ({report['mode']})"
    table = Table(title=title)
    for i, name in enumerate(_header(report)):
        table.add_column(name, justify="right" if i > 1 + len(report["differing_keys"]) else "left",
                         overflow="fold")
    for row, run in zip(report["rows"], runs, strict=True):
        row["config_cells"] = [_config_cell(run, k) for k in report["differing_keys"]]
        table.add_row(*_cells(report, row), style="bold" if row["best"] else None)
        del row["config_cells"]
    console.print(table)
    if not report["differing_keys"] and len(runs) > 1:
        console.print("(the runs' configs do not differ)")
    for group in report["groups"]:
        stats = ", ".join(f"{k} {_fmt(group['mean'].get(k))} ± {_fmt(group['std'].get(k))}"
                          for k in (f"test/{m}" for m in BAR_METRICS) if group["mean"].get(k) is not None)
        console.print(f"{group['label']}: {stats}")


def write_html(report: dict[str, Any], runs: Sequence[RunInfo], png: Path, path: Path) -> Path:
    image = base64.b64encode(png.read_bytes()).decode("ascii")
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in _header(report))
    body = []
    for row, run in zip(report["rows"], runs, strict=True):
        row["config_cells"] = [_config_cell(run, k) for k in report["differing_keys"]]
        cells = "".join(f"<td>{esc(c)}</td>" for c in _cells(report, row))
        del row["config_cells"]
        css = ' class="best"' if row["best"] else ""
        body.append(f"<tr{css}>{cells}</tr>")
    warnings = "".join(f"<p class=\"warn\">warning: {esc(w)}</p>" for w in report["warnings"])
    groups = "".join(
        f"<li>{esc(g['label'])}: " + ", ".join(
            f"{esc(k)} {_fmt(g['mean'].get(k))} ± {_fmt(g['std'].get(k))}" for k in (f"test/{m}" for m in BAR_METRICS)
            if g["mean"].get(k) is not None) + "</li>" for g in report["groups"])
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>medops run comparison</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}} td:nth-child(2),th:nth-child(2){{text-align:left}}
tr.best{{font-weight:bold;background:#fff6d5}} .warn{{color:#a40}} img{{max-width:100%}}</style></head>
<body><h1>Run comparison</h1>
<p>{len(runs)} runs ranked by <b>{esc(report['metric'])}</b> ({esc(report['mode'])});
best: {esc(str(report['best']))}</p>
{warnings}
<img alt="learning curves and test metrics" src="data:image/png;base64,{image}">
<table><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
{f"<h2>Cross-validation groups</h2><ul>{groups}</ul>" if groups else ""}
</body></html>
"""
    path.write_text(doc)
    return path


def write_outputs(report: dict[str, Any], runs: Sequence[RunInfo], out_dir: Path) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(runs, report["metric"], out_dir)
    page = write_html(report, runs, png, out_dir / "compare.html")
    outputs = {"png": str(png), "html": str(page), "json": str(out_dir / "compare.json")}
    report["outputs"] = outputs
    (out_dir / "compare.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return outputs


# ------------------------------------------------------------------------------------------------ CLI


def load_sources(sources: Sequence[str], group: str | None, tag: str | None, metric: str) -> list[RunInfo]:
    runs: list[RunInfo] = []
    for source in sources:
        if is_wandb_path(source):
            runs += load_wandb_runs(source, group=group, tag=tag, metric=metric)
            continue
        if not Path(source).exists():
            raise CompareError(f"{source}: no such file or folder (nor a W&B entity/project path)")
        local = load_local_runs([source])
        local = [r for r in local if (group is None or r.group == group) and (tag is None or tag in r.tags)]
        if not local and (group or tag):
            raise CompareError(f"{source}: no runs with" + (f" group={group}" if group else "")
                               + (f" tag={tag}" if tag else ""))
        runs += local
    if not runs:
        raise CompareError("no runs found")
    return runs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.compare",
        description="Compare training runs side by side: differing config keys, metrics, learning curves.")
    parser.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="run folder, folder of runs (e.g. a multirun sweep) or W&B entity/project")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help="ranking metric <split>/<name> (default test/auroc)")
    parser.add_argument("--mode", choices=("max", "min"), default=None,
                        help="max: highest is best (default; min for a loss)")
    parser.add_argument("--group", default=None, help="only runs of this W&B group")
    parser.add_argument("--tag", default=None, help="only runs with this tag")
    parser.add_argument("--out", default=None, help="output folder (default: the first local source, else ./compare)")
    parser.add_argument("--best", action="store_true", help="print only the best run's folder or W&B path")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    err = Console(stderr=True, highlight=False)
    try:
        _split_metric(args.metric)
        runs = load_sources(args.sources, args.group, args.tag, args.metric)
        available = available_metrics(runs)
        if args.metric.replace("best_val/", "val/", 1) not in available:
            raise CompareError(f"unknown metric {args.metric!r}; available: {', '.join(available) or 'none'}")
        mode = args.mode or default_mode(args.metric)
        ranked = rank(runs, args.metric, mode)
        report = build_report(ranked, args.metric, mode)
        for warning in report["warnings"]:
            err.print(f"[yellow]warning:[/yellow] {warning}")
        if args.best:
            if report["best"] is None:
                raise CompareError(f"no run has {args.metric}")
            print(report["best"])
            if args.out:
                write_outputs(report, ranked, Path(args.out))
            return 0
        if args.out:
            out_dir = Path(args.out)
        else:
            first = args.sources[0]
            out_dir = Path(first).parent if Path(first).is_file() else Path(first) if Path(first).exists() else Path(
                "compare")
        write_outputs(report, ranked, out_dir)
        if args.json:
            print(json.dumps(report, indent=2, default=str))
        else:
            print_table(report, ranked)
            Console(highlight=False, soft_wrap=True).print(
                f"wrote {report['outputs']['png']}, {report['outputs']['html']}, {report['outputs']['json']}")
    except CompareError as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
