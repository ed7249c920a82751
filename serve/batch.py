"""Batch predictions to CSV: parallel reading, concurrent requests, resumable output, and a summary with metrics.

Reading and preprocessing run in a thread pool while up to ``in_flight`` requests of ``batch_size`` images are
in flight, so Triton's dynamic batcher sees a steady stream. Rows are appended and flushed as requests complete;
a rerun on the same CSV skips the inputs already predicted. One unreadable image or one failed request costs
only its rows (written with the error), never the run.

Privacy: rows and messages carry the input path and :mod:`medops`'s error reason only (medops never puts DICOM
header values in a reason); the only header value read is the DICOM Modality, a defined term (CT, US...), for
the training-modality warning.

Torch-free: numpy, rich and the standard library.
"""

from __future__ import annotations

import csv
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

import medops
from medops.dicom import modality_warning
from medops.metrics import auroc_or_none as auroc
from medops.model_version import OUTPUT_NAME
from medops.run_record import RunRecordError, read_record
from serve.client import TritonBackend
from serve.contract import Backend, ModelInfo, ServeError, infer_outputs
from serve.inputs import InputItem, load_item, parse_label
from serve.predict import label_thresholds, ood_fields

__all__ = [
    "BatchSummary",
    "auroc",
    "compare_with_run",
    "csv_columns",
    "read_predictions",
    "run_batch",
]

log = logging.getLogger(__name__)


def csv_columns(class_names: Sequence[str]) -> list[str]:
    """The predictions CSV header for a model with these classes."""
    return ["key", "path", "label", "predicted", "predicted_index", *[f"prob_{c}" for c in class_names],
            "model", "version", "ood_score", "ood_flag", "warning", "error"]


@dataclass
class BatchSummary:
    """What a batch run did, how fast, and (when labels are known) how well, over every row of the CSV.

    ``done_now`` counts inputs processed by this run (predicted or failed), ``skipped`` those already in the CSV,
    ``errors`` this run's failed inputs. ``latency_ms`` holds p50/p95/p99 of the per-request time around
    ``backend.infer`` (None without a successful request). ``labelled``/``accuracy``/``auroc`` cover all predicted
    rows of the CSV with a label, resumed ones included; AUROC is that of P(class 1) for two classes, else the
    macro one-vs-rest mean over classes present; None when fewer than two classes are present.
    """

    total: int
    done_now: int
    skipped: int
    errors: int
    seconds: float
    images_per_s: float
    latency_ms: dict[str, float | None]
    accuracy: float | None = None
    auroc: float | None = None
    labelled: int = 0
    rows: int = 0
    requests: int = 0
    out_csv: str = ""
    model: str = ""
    version: str = ""
    ood_flagged: int = 0
    warnings: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> Table:
        table = Table(title=f"Batch predictions: {self.model} (version {self.version})")
        table.add_column("", style="bold")
        table.add_column("value", justify="right")
        lat = self.latency_ms
        latency = ("n/a" if lat.get("p50") is None else
                   f"{lat['p50']:.1f} / {lat['p95']:.1f} / {lat['p99']:.1f} ms")
        for name, value in (
            ("inputs", str(self.total)),
            ("processed now", str(self.done_now)),
            ("resumed (already in CSV)", str(self.skipped)),
            ("errors", str(self.errors)),
            ("time", f"{self.seconds:.1f} s"),
            ("throughput", f"{self.images_per_s:.1f} images/s"),
            ("requests", str(self.requests)),
            ("latency p50 / p95 / p99", latency),
            ("rows in CSV", str(self.rows)),
            ("labelled rows", str(self.labelled)),
            ("accuracy", _fmt(self.accuracy)),
            ("AUROC", _fmt(self.auroc)),
            ("out-of-distribution (ood_flag)", str(self.ood_flagged)),
            ("rows with a warning", str(self.warnings)),
            ("predictions", self.out_csv),
        ):
            table.add_row(name, value)
        return table


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("- images/s" if speed is None else f"{speed:.1f} images/s", style="progress.data.speed")


class _Senders:
    """The backend each request thread uses: tritonclient's HTTP client is not thread-safe (its docs), so with
    ``TritonBackend`` over HTTP every request thread gets its own connection; gRPC and local are shared."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.per_thread = isinstance(backend, TritonBackend) and backend.protocol == "http"
        self.local = threading.local()
        self.lock = threading.Lock()
        self.clones: list[TritonBackend] = []

    def get(self) -> Backend:
        if not self.per_thread:
            return self.backend
        clone = getattr(self.local, "backend", None)
        if clone is None:
            b = self.backend
            assert isinstance(b, TritonBackend)
            clone = TritonBackend(b.url, b.info.name, b.version or None, protocol="http", timeout=b.timeout,
                                  retries=b.retries, backoff=b.backoff, concurrency=1)
            with self.lock:
                self.clones.append(clone)
            self.local.backend = clone
        return clone

    def infer(self, arrays: list[np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        backend = self.get()
        batch = np.stack(arrays)
        started = time.perf_counter()
        outputs = infer_outputs(backend, batch)
        return outputs, time.perf_counter() - started

    def close(self) -> None:
        for clone in self.clones:
            try:
                clone.close()
            except Exception:  # closing is best effort
                log.debug("closing a request connection failed", exc_info=True)


class _Writer:
    """Appends prediction rows to the CSV and flushes them."""

    def __init__(self, path: Path, columns: list[str], info: ModelInfo) -> None:
        self.info = info
        self.width = len(info.class_names)
        self.thresholds = label_thresholds(info)  # multi-label: each label's threshold; None otherwise
        new = not path.exists() or path.stat().st_size == 0
        self.fh = path.open("a", newline="", encoding="utf-8")
        self.writer = csv.writer(self.fh)
        if new:
            self.writer.writerow(columns)
            self.fh.flush()

    def label_text(self, label: int | None) -> str:
        if label is None:
            return ""
        return self.info.class_names[label] if 0 <= label < self.width else str(label)

    def prediction(self, item: InputItem, probs: np.ndarray, ood: dict[str, Any]) -> None:
        index = int(np.argmax(probs))
        warnings = [w for w in (modality_warning(item.path, self.info.modalities) if item.path else None,) if w]
        if ood.get("ood_flag"):
            warnings.append("out of distribution (ood_score above the validation threshold)")
        predicted = self.info.class_names[index] if self.thresholds is None else label_set(probs, self.thresholds)
        self.writer.writerow([item.key, item.path or "", self.label_text(item.label), predicted,
                              index, *(format(float(p), ".9g") for p in probs), self.info.name, self.info.version,
                              ood.get("ood_score", ""), {True: "1", False: "0"}.get(ood.get("ood_flag"), ""),
                              "; ".join(warnings), ""])

    def error(self, item: InputItem, message: str) -> None:
        self.writer.writerow([item.key, item.path or "", self.label_text(item.label), "", "", *[""] * self.width,
                              self.info.name, self.info.version, "", "", "", " ".join(message.split())])

    def flush(self) -> None:
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


NO_LABEL = "(none)"  # multi-label: no label at or above its threshold


def label_set(probs: np.ndarray, thresholds: dict[str, float]) -> str:
    """A multi-label prediction for the CSV: the labels at or above their thresholds joined by ``+``, or ``(none)``."""
    present = [name for (name, t), p in zip(thresholds.items(), probs, strict=True) if p >= t]
    return "+".join(present) or NO_LABEL


def read_predictions(out_csv: str | Path, class_names: Sequence[str]) -> list[dict[str, str]]:
    """The complete rows of a predictions CSV written for these classes, last row per key (a row cut short by an
    interruption is dropped). Raises ServeError when the header belongs to another model's classes."""
    path = Path(out_csv)
    columns = csv_columns(class_names)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            return []
        if header != columns:
            raise ServeError(f"{path}: existing predictions have columns {header}, but this model writes "
                             f"{columns}; write to another file or turn resume off")
        rows: dict[str, dict[str, str]] = {}
        for record in reader:
            if len(record) != len(columns):
                continue
            row = dict(zip(columns, record, strict=True))
            if not row["error"] and not _complete(row, class_names):
                continue
            rows.pop(row["key"], None)
            rows[row["key"]] = row
    return list(rows.values())


def _complete(row: dict[str, str], class_names: Sequence[str]) -> bool:
    try:
        probs = [float(row[f"prob_{c}"]) for c in class_names]
        index = int(row["predicted_index"])
    except ValueError:
        return False
    if not (row["model"] and 0 <= index < len(probs)):
        return False
    if row["predicted"] == class_names[index]:
        return True
    return row["predicted"] == NO_LABEL or set(row["predicted"].split("+")) <= set(class_names)  # multi-label


def _prepare_csv(path: Path, columns: list[str], class_names: Sequence[str], resume: bool) -> set[str]:
    """Keys already predicted (resume) after rewriting the CSV with just those rows; else a fresh, empty CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not resume or not path.exists():
        path.unlink(missing_ok=True)
        return set()
    kept = [row for row in read_predictions(path, class_names) if not row["error"]]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(kept)
    os.replace(tmp, path)  # failed and cut-short rows are dropped and redone
    return {row["key"] for row in kept}


def _check_arguments(items: Sequence[InputItem], workers: int, in_flight: int, batch_size: int) -> None:
    """Raise ServeError for a pool size below 1 or duplicate input keys."""
    for name, value in (("workers", workers), ("in_flight", in_flight), ("batch_size", batch_size)):
        if value < 1:
            raise ServeError(f"{name} must be >= 1, got {value}")
    keys = [item.key for item in items]
    if len(set(keys)) != len(keys):
        raise ServeError("input keys are not unique; each input needs its own row key")


def _progress_bar(progress: bool) -> Progress:
    """The stderr progress bar (count, rate, errors, times); disabled without ``progress``."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                    TextColumn("{task.fields[errors]} errors"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not progress)


def _latency_ms(latencies: list[float]) -> dict[str, float | None]:
    """p50/p95/p99 in milliseconds of per-request seconds (None without a request)."""
    if not latencies:
        return {"p50": None, "p95": None, "p99": None}
    p50, p95, p99 = (float(v) for v in np.percentile(np.array(latencies) * 1000.0, [50, 95, 99]))
    return {"p50": p50, "p95": p95, "p99": p99}


class _BatchRun:
    """One pass over the items still to predict: a read pool feeding up to ``in_flight`` requests, the CSV writer
    and the progress bar; ``done``, ``errors`` and ``latencies`` count what it did."""

    def __init__(self, backend: Backend, info: ModelInfo, out: Path, columns: list[str], total: int, *,
                 workers: int, in_flight: int, batch_size: int, progress: bool) -> None:
        self.info = info
        self.workers, self.in_flight, self.batch_size = workers, in_flight, batch_size
        self.writer = _Writer(out, columns, self.info)
        self.senders = _Senders(backend)
        self.loader = ThreadPoolExecutor(workers, thread_name_prefix="medops-read")
        self.sender = ThreadPoolExecutor(in_flight, thread_name_prefix="medops-infer")
        self.bar = _progress_bar(progress)
        self.task = self.bar.add_task(f"{self.info.name} v{self.info.version}", total=total, errors=0)
        self.latencies: list[float] = []
        self.done = 0
        self.errors = 0
        self.inflight: dict[Future, list[InputItem]] = {}

    def run(self, todo: list[InputItem]) -> None:
        """Read, send and write every item, then shut the pools and close the CSV."""
        try:
            with self.bar:
                self._read_and_send(todo)
                while self.inflight:
                    self._collect(block=True)
        finally:
            self.loader.shutdown(wait=True, cancel_futures=True)
            self.sender.shutdown(wait=True, cancel_futures=True)
            self.senders.close()
            self.writer.close()

    def _prefetched(self, todo: list[InputItem]) -> Iterator[tuple[InputItem, Future]]:
        """The items in order with their read futures, keeping a lookahead of reads submitted to the pool."""
        lookahead = max(self.batch_size * (self.in_flight + 1), 2 * self.workers)
        pending = iter(todo)
        loads: deque[tuple[InputItem, Future]] = deque()

        def top_up() -> None:
            while len(loads) < lookahead:
                item = next(pending, None)
                if item is None:
                    return
                loads.append((item, self.loader.submit(load_item, item, self.info)))

        top_up()
        while loads:
            item, fut = loads.popleft()
            top_up()
            yield item, fut

    def _read_and_send(self, todo: list[InputItem]) -> None:
        """Group the read images into requests of ``batch_size``; an unreadable image becomes an error row."""
        group: list[InputItem] = []
        arrays: list[np.ndarray] = []
        for item, fut in self._prefetched(todo):
            try:
                array = fut.result()
            except medops.ImageReadError as exc:
                self._failed(item, str(exc))
                self._flush()
            else:
                group.append(item)
                arrays.append(array)
                if len(group) == self.batch_size:
                    self._send(group, arrays)
                    group, arrays = [], []
            self._collect(block=False)
        if group:
            self._send(group, arrays)

    def _send(self, group: list[InputItem], arrays: list[np.ndarray]) -> None:
        """Submit one request, first waiting while ``in_flight`` requests are running."""
        while len(self.inflight) >= self.in_flight:
            self._collect(block=True)
        self.inflight[self.sender.submit(self.senders.infer, arrays)] = group

    def _collect(self, block: bool) -> None:
        """Write the rows of finished requests (waiting for one with ``block``)."""
        if not self.inflight:
            return
        finished = (wait(self.inflight, return_when=FIRST_COMPLETED)[0] if block
                    else [f for f in self.inflight if f.done()])
        for fut in finished:
            self._write(self.inflight.pop(fut), fut)
            self._flush()

    def _write(self, group: list[InputItem], fut: Future) -> None:
        """The rows of one finished request: predictions, or an error row per image."""
        try:
            outputs, seconds = fut.result()
        except ServeError as exc:
            for item in group:
                self._failed(item, str(exc))
            return
        probs = np.asarray(outputs[OUTPUT_NAME])
        if probs.shape != (len(group), len(self.info.class_names)):
            for item in group:
                self._failed(item, f"backend returned shape {list(probs.shape)} for {len(group)} images")
            return
        self.latencies.append(seconds)
        for i, (item, row) in enumerate(zip(group, probs, strict=True)):
            self.writer.prediction(item, row, ood_fields(outputs, i))
        self.done += len(group)

    def _failed(self, item: InputItem, message: str) -> None:
        self.writer.error(item, message)
        self.done += 1
        self.errors += 1

    def _flush(self) -> None:
        self.writer.flush()
        self.bar.update(self.task, completed=self.done, errors=self.errors)


def run_batch(items: Sequence[InputItem], backend: Backend, out_csv: str | Path, *, workers: int = 2,
              in_flight: int = 4, batch_size: int = 16, resume: bool = True, progress: bool = True) -> BatchSummary:
    """Predict every item with ``backend`` into ``out_csv``, one row per input; see the module docstring.

    ``workers`` threads read and preprocess; up to ``in_flight`` requests of ``batch_size`` images run at once.
    With ``resume`` and an existing ``out_csv``, items whose key already has a prediction there are skipped and
    rows of previously failed items are redone; without it the CSV is started afresh.
    """
    _check_arguments(items, workers, in_flight, batch_size)
    info = backend.info
    out = Path(out_csv)
    columns = csv_columns(info.class_names)
    done_keys = _prepare_csv(out, columns, info.class_names, resume)
    todo = [item for item in items if item.key not in done_keys]
    run = _BatchRun(backend, info, out, columns, len(todo), workers=workers, in_flight=in_flight,
                    batch_size=batch_size, progress=progress)
    started = time.perf_counter()
    run.run(todo)
    seconds = time.perf_counter() - started
    return _summarise(run, out, total=len(items), skipped=len(items) - len(todo), seconds=seconds)


def _summarise(run: _BatchRun, out: Path, *, total: int, skipped: int, seconds: float) -> BatchSummary:
    """The summary of a finished run, with metrics over every row now in the CSV."""
    info = run.info
    rows = read_predictions(out, info.class_names)
    labelled, accuracy, auc = _metrics(rows, info.class_names)
    return BatchSummary(
        total=total, done_now=run.done, skipped=skipped, errors=run.errors, seconds=seconds,
        images_per_s=run.done / seconds if seconds > 0 else 0.0, latency_ms=_latency_ms(run.latencies),
        accuracy=accuracy, auroc=auc, labelled=labelled, rows=len(rows), requests=len(run.latencies),
        out_csv=str(out), model=info.name, version=info.version,
        ood_flagged=sum(row["ood_flag"] == "1" for row in rows), warnings=sum(bool(row["warning"]) for row in rows),
    )


def _metrics(rows: list[dict[str, str]], class_names: Sequence[str]) -> tuple[int, float | None, float | None]:
    labels, probs = [], []
    for row in rows:
        if row["error"] or not row["label"]:
            continue
        try:
            label = parse_label(row["label"], class_names)
        except ServeError:
            continue
        if label is None:
            continue
        labels.append(label)
        probs.append([float(row[f"prob_{c}"]) for c in class_names])
    if not labels:
        return 0, None, None
    y = np.array(labels, dtype=np.int64)
    p = np.array(probs, dtype=np.float64)
    accuracy = float(np.mean(np.argmax(p, axis=1) == y))
    return len(labels), accuracy, auroc(y, p)


def compare_with_run(summary: BatchSummary, run_json: str | Path) -> Table:
    """The batch's accuracy and AUROC next to the training run's ``test`` metrics (``run.json`` or its folder)."""
    try:
        record = read_record(run_json)
    except RunRecordError as exc:
        raise ServeError(str(exc)) from None
    path, test, data = record.path, record.test, record.data
    test_counts = (data.get("counts") or {}).get("test")
    n_test = sum(test_counts) if isinstance(test_counts, list) else None
    table = Table(title=f"Batch predictions vs training run {record.run_id or record.run_dir.name} (test split)")
    table.add_column("metric", style="bold")
    table.add_column("batch", justify="right")
    table.add_column("training test", justify="right")
    table.add_column("difference", justify="right")
    for name, mine, theirs in (("accuracy", summary.accuracy, test.get("acc")),
                               ("AUROC", summary.auroc, test.get("auroc"))):
        theirs = float(theirs) if isinstance(theirs, (int, float)) else None
        diff = f"{mine - theirs:+.4f}" if mine is not None and theirs is not None else "n/a"
        table.add_row(name, _fmt(mine), _fmt(theirs), diff)
    table.add_row("labelled images", str(summary.labelled), "n/a" if n_test is None else str(n_test), "")
    notes = [f"run record: {path}"]
    if not test:
        notes.append("the run has no test metrics")
    if summary.labelled == 0:
        notes.append("no labelled predictions in the batch")
    table.caption = "; ".join(notes)
    return table
