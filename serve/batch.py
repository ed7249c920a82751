"""Batch predictions to CSV: parallel reading, concurrent requests, resumable output, and a summary with metrics.

Reading and preprocessing run in a thread pool while up to ``in_flight`` requests of ``batch_size`` images are
in flight, so Triton's dynamic batcher sees a steady stream. Rows are appended and flushed as requests complete;
a rerun on the same CSV skips the inputs already predicted, provided they were made by the same model version from
the same input source (else it refuses and changes nothing). One unreadable image or one failed request costs only its
rows (written with the error), never the run; a server that stops answering (``DOWN_AFTER`` requests in a row
cannot connect) ends the run with :class:`serve.contract.ServerUnreachable`, the rows written so far kept.

The ``predicted`` column is the version's decision (:func:`serve.predict.serving_rule`): at its operating point when
it has one (binary: P(positive class) >= threshold; multi-label: each label at or above its threshold), else the
arg-max class; ``decision_rule`` says which, ``argmax`` keeps the arg-max class, and ``abnormal`` the abnormal call
of a multi-class model with a declared abnormal set. The summary's accuracy, sensitivity and specificity are taken
at that decision.

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
from medops.decision import DecisionRule
from medops.dicom import modality_warning
from medops.metrics import auroc_or_none as auroc
from medops.model_version import OUTPUT_NAME
from medops.run_record import RunRecordError, read_record
from serve.client import TritonBackend
from serve.contract import Backend, ModelInfo, ServeError, ServerUnreachable, infer_outputs
from serve.inputs import InputItem, load_item, parse_label
from serve.predict import ood_fields, rule_text, serving_rule

__all__ = [
    "DOWN_AFTER",
    "BatchSummary",
    "auroc",
    "compare_with_run",
    "csv_columns",
    "read_predictions",
    "run_batch",
]

log = logging.getLogger(__name__)

DOWN_AFTER = 3  # requests in a row that cannot reach the server: it is down, the run stops


def csv_columns(class_names: Sequence[str]) -> list[str]:
    """The predictions CSV header for a model with these classes: ``predicted`` (the decision; ``predicted_index``
    its class index, empty for multi-label), ``decision_rule``, ``argmax``, ``abnormal`` (1/0 for a multi-class model
    with a declared abnormal set, else empty), one ``prob_<class>`` per class, ``model``, ``version``, ``source``
    (the input the row came from), the out-of-distribution columns, ``warning`` and ``error``."""
    return ["key", "path", "label", "predicted", "predicted_index", "decision_rule", "argmax", "abnormal",
            *[f"prob_{c}" for c in class_names], "model", "version", "source", "ood_score", "ood_flag", "warning",
            "error"]


@dataclass
class BatchSummary:
    """What a batch run did, how fast, and (when labels are known) how well, over every row of the CSV.

    ``done_now`` counts inputs processed by this run (predicted or failed), ``skipped`` those already in the CSV,
    ``errors`` this run's failed inputs. ``latency_ms`` holds p50/p95/p99 of the per-request time around
    ``backend.infer`` (None without a successful request). ``labelled``/``accuracy``/``auroc`` cover all predicted
    rows of the CSV with a label, resumed ones included. ``accuracy`` is that of the decision (``decision``: the
    rule in words; ``threshold``: the operating point of a binary decision, else None), ``sensitivity`` and
    ``specificity`` those of the call ``call`` (e.g. ``P(malignant) >= 0.2016``) for ``positive`` (the positive
    class, or ``abnormal``; both empty for a plain arg-max decision), ``accuracy_argmax`` that of the arg-max
    class. AUROC (threshold-free) is that of P(class 1) for two classes, else the macro one-vs-rest mean over classes
    present; None when fewer than two classes are present.
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
    decision: str = "arg-max class (no operating point)"
    threshold: float | None = None
    positive: str = ""
    call: str = ""
    sensitivity: float | None = None
    specificity: float | None = None
    accuracy_argmax: float | None = None

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
            ("decision (CSV column predicted)", self.decision),
            ("labelled rows", str(self.labelled)),
            *self.metric_rows(),
            ("out-of-distribution (ood_flag)", str(self.ood_flagged)),
            ("rows with a warning", str(self.warnings)),
            ("predictions", self.out_csv),
        ):
            table.add_row(name, value)
        return table


    def metric_rows(self) -> list[tuple[str, str]]:
        """(name, value) of the labelled metrics, each name saying the decision it is taken at."""
        accuracy = f"accuracy at {self.decision}" if self.threshold is not None else "accuracy (arg-max class)"
        rows = [(accuracy, _fmt(self.accuracy))]
        if self.positive:
            rows += [(f"sensitivity for {self.positive} at {self.call}", _fmt(self.sensitivity)),
                     (f"specificity for {self.positive} at {self.call}", _fmt(self.specificity))]
        if self.threshold is not None:
            rows.append(("accuracy (arg-max class)", _fmt(self.accuracy_argmax)))
        return [*rows, ("AUROC (threshold-free)", _fmt(self.auroc))]


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

    def __init__(self, path: Path, columns: list[str], info: ModelInfo, source: str = "") -> None:
        self.info, self.source = info, source
        self.width = len(info.class_names)
        self.rule = serving_rule(info)
        self.rule_text = rule_text(self.rule, info.class_names)
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
        warnings = [w for w in (modality_warning(item.path, self.info.modalities) if item.path else None,) if w]
        if ood.get("ood_flag"):
            warnings.append("out of distribution (ood_score above the validation threshold)")
        predicted, index, abnormal = decide(self.rule, probs, self.info.class_names)
        self.writer.writerow([item.key, item.path or "", self.label_text(item.label), predicted, index,
                              self.rule_text, self.info.class_names[int(np.argmax(probs))], abnormal,
                              *(format(float(p), ".9g") for p in probs), self.info.name, self.info.version,
                              self.source, ood.get("ood_score", ""),
                              {True: "1", False: "0"}.get(ood.get("ood_flag"), ""), "; ".join(warnings), ""])

    def error(self, item: InputItem, message: str) -> None:
        self.writer.writerow([item.key, item.path or "", self.label_text(item.label), "", "", self.rule_text, "", "",
                              *[""] * self.width, self.info.name, self.info.version, self.source, "", "", "",
                              " ".join(message.split())])

    def flush(self) -> None:
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


NO_LABEL = "(none)"  # multi-label: no label at or above its threshold


def decide(rule: DecisionRule, probs: np.ndarray, class_names: Sequence[str]) -> tuple[str, str, str]:
    """One image's ``predicted``, ``predicted_index`` and ``abnormal`` cells under ``rule``: the class at the
    operating point (binary), the labels at or above their thresholds joined by ``+`` or ``(none)`` (multi-label;
    no index), or the arg-max class (and ``1``/``0`` for the abnormal call when the rule has one)."""
    if rule.kind == "labels":
        present = [name for name, p, t in zip(class_names, probs, rule.label_thresholds, strict=True) if p >= t]
        return "+".join(present) or NO_LABEL, "", ""
    decided = rule.decide(np.asarray(probs)[None, :])[0]
    if rule.kind == "threshold":
        index = rule.positive_index if bool(decided[0]) else 1 - rule.positive_index
        return class_names[index], str(index), ""
    abnormal = ("1" if int(decided[1]) else "0") if len(decided) > 1 else ""
    return class_names[int(decided[0])], str(int(decided[0])), abnormal


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
                             f"{columns}; nothing was changed: pass --no-resume to start over, or write to another "
                             "--out")
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
        [float(row[f"prob_{c}"]) for c in class_names]
    except ValueError:
        return False
    if not (row["model"] and row["argmax"] in class_names):
        return False
    if row["predicted_index"] == "":  # multi-label: the labels present, `+`-joined, or (none)
        return row["predicted"] == NO_LABEL or set(row["predicted"].split("+")) <= set(class_names)
    return row["predicted"] in class_names and row["predicted_index"] == str(list(class_names).index(row["predicted"]))


def _prepare_csv(path: Path, columns: list[str], info: ModelInfo, source: str, resume: bool) -> set[str]:
    """Keys already predicted (resume) after rewriting the CSV with just those rows; else a fresh, empty CSV.

    Raises ServeError, changing nothing, when the rows to resume were made by another model or version, or from
    another input source."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not resume or not path.exists():
        path.unlink(missing_ok=True)
        return set()
    rows = read_predictions(path, info.class_names)
    _check_same_origin(path, rows, info, source)
    kept = [row for row in rows if not row["error"]]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(kept)
    os.replace(tmp, path)  # failed and cut-short rows are dropped and redone
    return {row["key"] for row in kept}


def _check_same_origin(path: Path, rows: list[dict[str, str]], info: ModelInfo, source: str) -> None:
    """Refuse to resume rows made by another model version or from another input (``source``)."""
    wanted = (info.name, str(info.version), source)
    other = next(((r["model"], r["version"], r["source"]) for r in rows
                  if (r["model"], r["version"], r["source"]) != wanted), None)
    if other is None:
        return
    raise ServeError(
        f"{path} holds predictions of {other[0]} v{other[1]} from {other[2] or 'an unnamed input'}, but this run "
        f"uses {info.name} v{info.version} on {source or 'an unnamed input'}; resuming would mix them, so nothing "
        "was changed: pass --no-resume to start over, or write to another --out")


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
    and the progress bar; ``done``, ``errors`` and ``latencies`` count what it did. ``DOWN_AFTER`` requests in a
    row that cannot reach the server stop it with :class:`ServerUnreachable` (the rows written so far are kept)."""

    def __init__(self, backend: Backend, info: ModelInfo, out: Path, columns: list[str], total: int, *,
                 workers: int, in_flight: int, batch_size: int, progress: bool, source: str = "") -> None:
        self.info, self.out = info, out
        self.workers, self.in_flight, self.batch_size = workers, in_flight, batch_size
        self.writer = _Writer(out, columns, self.info, source)
        self.senders = _Senders(backend)
        self.loader = ThreadPoolExecutor(workers, thread_name_prefix="medops-read")
        self.sender = ThreadPoolExecutor(in_flight, thread_name_prefix="medops-infer")
        self.bar = _progress_bar(progress)
        self.task = self.bar.add_task(f"{self.info.name} v{self.info.version}", total=total, errors=0)
        self.latencies: list[float] = []
        self.done = 0
        self.errors = 0
        self.unreachable = 0  # requests in a row that could not reach the server
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
        except ServerUnreachable as exc:
            self.unreachable += 1
            if self.unreachable >= DOWN_AFTER:
                raise ServerUnreachable(
                    f"the server stopped answering: {self.unreachable} requests in a row could not reach it (last: "
                    f"{exc}); the {self.done - self.errors} prediction(s) of this run written so far are kept in "
                    f"{self.out}: rerun the same command to resume once the server is back") from exc
            for item in group:
                self._failed(item, str(exc))
            return
        except ServeError as exc:
            for item in group:
                self._failed(item, str(exc))
            return
        self.unreachable = 0
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
              in_flight: int = 4, batch_size: int = 16, resume: bool = True, progress: bool = True,
              source: str = "") -> BatchSummary:
    """Predict every item with ``backend`` into ``out_csv``, one row per input; see the module docstring.

    ``workers`` threads read and preprocess; up to ``in_flight`` requests of ``batch_size`` images run at once.
    ``source`` names the input (written to each row). With ``resume`` and an existing ``out_csv``, items whose key
    already has a prediction there are skipped and rows of previously failed items are redone; without it the CSV
    is started afresh.

    Raises:
        ServeError: the rows to resume came from another model, version or source (nothing changed).
        ServerUnreachable: the server stopped answering mid-run (the rows written so far are kept).
    """
    _check_arguments(items, workers, in_flight, batch_size)
    info = backend.info
    out = Path(out_csv)
    columns = csv_columns(info.class_names)
    done_keys = _prepare_csv(out, columns, info, source, resume)
    todo = [item for item in items if item.key not in done_keys]
    run = _BatchRun(backend, info, out, columns, len(todo), workers=workers, in_flight=in_flight,
                    batch_size=batch_size, progress=progress, source=source)
    started = time.perf_counter()
    run.run(todo)
    seconds = time.perf_counter() - started
    return _summarise(run, out, total=len(items), skipped=len(items) - len(todo), seconds=seconds)


def _summarise(run: _BatchRun, out: Path, *, total: int, skipped: int, seconds: float) -> BatchSummary:
    """The summary of a finished run, with metrics over every row now in the CSV."""
    info = run.info
    rows = read_predictions(out, info.class_names)
    rule = run.writer.rule
    return BatchSummary(
        total=total, done_now=run.done, skipped=skipped, errors=run.errors, seconds=seconds,
        images_per_s=run.done / seconds if seconds > 0 else 0.0, latency_ms=_latency_ms(run.latencies),
        rows=len(rows), requests=len(run.latencies), out_csv=str(out), model=info.name, version=info.version,
        ood_flagged=sum(row["ood_flag"] == "1" for row in rows), warnings=sum(bool(row["warning"]) for row in rows),
        decision=run.writer.rule_text, threshold=rule.threshold if rule.kind == "threshold" else None,
        **_call(rule, info.class_names), **_metrics(rows, info.class_names, rule),
    )


def _call(rule: DecisionRule, class_names: Sequence[str]) -> dict[str, str]:
    """``positive`` and ``call`` of a binary operating point (the positive class) or an abnormal call (``abnormal``);
    nothing for a plain arg-max decision or multi-label."""
    if rule.kind == "threshold":
        return {"positive": str(rule.positive_class), "call": f"P({rule.positive_class}) >= {rule.threshold:.4f}"}
    if rule.kind == "argmax" and rule.abnormal_indices and rule.abnormal_threshold is not None:
        names = " + ".join(class_names[i] for i in rule.abnormal_indices)
        return {"positive": "abnormal", "call": f"P({names}) >= {rule.abnormal_threshold:.4f}"}
    return {}


def _metrics(rows: list[dict[str, str]], class_names: Sequence[str], rule: DecisionRule) -> dict[str, Any]:
    """``labelled``, ``accuracy`` of the ``predicted`` decision, ``accuracy_argmax``, ``auroc`` and, for a binary
    operating point or an abnormal call, ``sensitivity`` and ``specificity`` over the predicted rows with a
    single-class label. None for multi-label versions: a row's labels are a set, which ``python -m
    evaluation.evaluate`` scores per label."""
    if rule.kind == "labels":
        return {}
    labelled = []
    for row in rows:
        if row["error"] or not row["label"]:
            continue
        try:
            label = parse_label(row["label"], class_names)
        except ServeError:
            continue
        if label is not None:
            labelled.append((label, row))
    if not labelled:
        return {}
    y = np.array([label for label, _ in labelled], dtype=np.int64)
    p = np.array([[float(row[f"prob_{c}"]) for c in class_names] for _, row in labelled], dtype=np.float64)
    decided = np.array([row["predicted_index"] == str(label) for label, row in labelled])
    out: dict[str, Any] = {"labelled": len(labelled), "accuracy": float(decided.mean()),
                           "accuracy_argmax": float(np.mean(p.argmax(1) == y)), "auroc": auroc(y, p)}
    if rule.kind == "threshold":
        truth = y == rule.positive_index
        called = np.array([row["predicted"] == rule.positive_class for _, row in labelled])
    elif rule.abnormal_indices and rule.abnormal_threshold is not None:
        truth = np.isin(y, rule.abnormal_indices)
        called = np.array([row["abnormal"] == "1" for _, row in labelled])
    else:
        return out
    out["sensitivity"] = float(called[truth].mean()) if truth.any() else None
    out["specificity"] = float((~called[~truth]).mean()) if (~truth).any() else None
    return out


def compare_with_run(summary: BatchSummary, run_json: str | Path) -> Table:
    """The batch's metrics next to the training run's ``test`` metrics (``run.json`` or its folder), like with like:
    each row says the decision both sides use. The arg-max accuracy is compared with the run's accuracy (taken at
    the arg-max); a binary version's operating-point figures with the run's test figures at its own operating point,
    when that is the same threshold; AUROC is threshold-free."""
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
    notes = [f"run record: {path}"]
    rows = _operating_point_rows(summary, record.raw.get("threshold") or {}, notes)
    argmax = summary.accuracy_argmax if summary.threshold is not None else summary.accuracy
    rows += [("accuracy (arg-max class)", argmax, test.get("acc")),
             ("AUROC (threshold-free)", summary.auroc, test.get("auroc"))]
    for name, mine, theirs in rows:
        theirs = float(theirs) if isinstance(theirs, (int, float)) else None
        diff = f"{mine - theirs:+.4f}" if mine is not None and theirs is not None else "n/a"
        table.add_row(name, _fmt(mine), _fmt(theirs), diff)
    table.add_row("labelled images", str(summary.labelled), "n/a" if n_test is None else str(n_test), "")
    if not test:
        notes.append("the run has no test metrics")
    if summary.labelled == 0:
        notes.append("no labelled predictions in the batch")
    table.caption = "; ".join(notes)
    return table


def _operating_point_rows(summary: BatchSummary, run_threshold: dict[str, Any],
                          notes: list[str]) -> list[tuple[str, float | None, Any]]:
    """The rows at a binary version's operating point: the run's test figures only where the run chose the same
    threshold for the same class (else n/a, and a note says why)."""
    if summary.threshold is None:
        notes.append(f"decision of both: the arg-max class (the batch's predicted column: {summary.decision})")
        return []
    value, theirs = run_threshold.get("value"), run_threshold.get("test") or {}
    same = (isinstance(value, (int, float)) and abs(float(value) - summary.threshold) <= 1e-6
            and run_threshold.get("positive_class") in (None, summary.positive))
    if same:
        notes.append(f"operating-point rows: both at {summary.decision}")
    elif isinstance(value, (int, float)):
        notes.append(f"the run's operating point (P({run_threshold.get('positive_class')}) >= {float(value):.4f}) "
                     f"is not the version's ({summary.decision}): no like-for-like figure")
        theirs = {}
    else:
        notes.append("the run recorded no operating point")
        theirs = {}
    return [(f"accuracy at {summary.decision}", summary.accuracy, theirs.get("acc")),
            (f"sensitivity for {summary.positive}", summary.sensitivity, theirs.get("sensitivity")),
            (f"specificity for {summary.positive}", summary.specificity, theirs.get("specificity"))]
