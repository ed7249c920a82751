"""Pull a PACS query result over DICOMweb into a de-identified dataset (PNGs + ``manifest.csv``), resumably.

    python -m datatools.pacs_query URL DST [--modality CT] [--study-date 20240101-20241231] [--salt S]
        [--window C W] [--pixels quarantine|clean|keep] [--sidecar] [--patient-split VAL TEST]
        [--max-instances N] [--no-progress]

* QIDO-RS finds the studies matching ``--modality`` (ModalitiesInStudy) and ``--study-date`` (a DICOM date or
  range, ``YYYYMMDD-YYYYMMDD``); of each study, the series of that modality (every series without ``--modality``)
  and their instances. WADO-RS retrieves one instance at a time.
* Every instance goes through the very same code as a file given to ``python -m datatools.ingest_dicom``:
  pseudonymous names, burned-in text quarantine (``--pixels``), de-identified header sidecars (``--sidecar``), the
  same ``manifest.csv`` and ``ingest_report.json``. The retrieved instance only lives in a private temporary file
  (mode 0600) while it is read; nothing identifying is written to DST, the report or the log (an instance is named
  by a salted digest of its SOP Instance UID).
* Resumable: after every instance, ``DST/pull_state.json`` records it (by that salted digest) with its manifest rows;
  the file is replaced atomically, so a pull that is killed (or stopped by ``--max-instances``) resumes where it
  stopped and never retrieves an instance again. ``manifest.csv`` and ``ingest_report.json`` are rewritten from the
  state at the end of every run. A DST holding a pull of another query is refused.
* Exit status 0 when the query is pulled completely with at least one image; 1 when nothing matched or no image
  could be written; 3 when ``--max-instances`` left instances to pull (run the same command again).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from datatools.ingest_dicom import (
    PIXEL_MODES,
    SALT_ENV,
    Result,
    _file_items,
    _h,
    _store_item,
    ingest_logging,
    log,
    write_dataset,
    write_report,
)
from medops.pacs import PacsError, as_file, find_instances, find_series, find_studies, open_client, retrieve_instance

STATE_FILE = "pull_state.json"
STATE_FORMAT = "medops.pacs-pull/1"
EXIT_OK, EXIT_NOTHING, EXIT_PARTIAL = 0, 1, 3
console = Console(stderr=True)


class PullError(RuntimeError):
    """DST cannot take this pull (it holds another query's)."""


def query_filters(modality: str | None, study_date: str | None) -> dict[str, str]:
    """The QIDO-RS study search filters of the command line."""
    filters = {}
    if modality:
        filters["ModalitiesInStudy"] = modality
    if study_date:
        filters["StudyDate"] = study_date
    return filters


def list_instances(client: Any, filters: dict[str, str], modality: str | None) -> list[tuple[str, str, str]]:
    """``(study, series, instance)`` UIDs of the query result, in a stable order."""
    found = []
    for study in sorted(find_studies(client, filters)):
        for ref in find_series(client, study):
            if modality and ref.modality.upper() != modality.upper():
                continue
            found += [(study, ref.series_uid, sop) for sop in sorted(find_instances(client, study, ref.series_uid))]
    return found


def load_state(dst: Path, query: dict[str, str]) -> dict[str, Any]:
    """The pull state of DST (a new one when there is none). Raises PullError when DST holds another query."""
    path = dst / STATE_FILE
    if not path.is_file():
        return {"format": STATE_FORMAT, "query": query, "done": {}}
    state = json.loads(path.read_text())
    if state.get("format") != STATE_FORMAT or state.get("query") != query:
        raise PullError(f"{dst} holds a pull of another query ({state.get('query')}); use another DST")
    return state


def save_state(dst: Path, state: dict[str, Any]) -> None:
    """Write the state atomically (a kill leaves the previous or the new state, never half of one)."""
    tmp = dst / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, dst / STATE_FILE)


def pull_one(client: Any, uids: tuple[str, str, str], key: str, args: argparse.Namespace, dst: Path,
             number: int, total: int) -> dict[str, Any]:
    """Retrieve one instance and ingest it like a file; its state entry (manifest rows and report entries)."""
    result, rows = Result(), []
    try:
        ds = retrieve_instance(client, *uids)
    except PacsError as exc:
        return {"rows": [], "errors": [{"file": number, "source": key, "reason": str(exc)}]}
    with as_file(ds) as path:
        renamed = path.with_name(f"{key}.dcm")  # the report names the instance by its salted digest only
        path.rename(renamed)
        items = _file_items(renamed, renamed.parent, dst, args, result, number, total)
    for entry in (*result.errors, *result.skipped, *result.quarantined, *result.burned_in):
        entry["source"] = key  # the instance's digest, as pull_state.json keys it (no source file to locate)
    for item in items or []:
        _store_item(item, args, dst, rows, [])
    return {"rows": rows, "errors": result.errors, "skipped": result.skipped, "quarantined": result.quarantined,
            "burned_in": result.burned_in}


def finish(dst: Path, state: dict[str, Any], pixels: str) -> Result:
    """``manifest.csv`` and ``ingest_report.json`` from every instance pulled so far."""
    result, rows = Result(), []
    for entry in state["done"].values():
        rows += entry["rows"]
        result.items += len(entry["rows"])
        result.files_ok += bool(entry["rows"])
        result.errors += entry.get("errors", [])
        result.skipped += entry.get("skipped", [])
        result.quarantined += entry.get("quarantined", [])
        result.burned_in += entry.get("burned_in", [])
    write_dataset(dst, "png", rows, [])
    write_report(dst, len(state["done"]), result, "png", pixels)
    return result


def pull(args: argparse.Namespace) -> int:
    """The whole pull (see the module docstring); the exit status."""
    dst = Path(args.dst)
    (dst / "images").mkdir(parents=True, exist_ok=True)
    query = query_filters(args.modality, args.study_date)
    state = load_state(dst, query)
    client = open_client(args.url, timeout=args.timeout)
    instances = list_instances(client, query, args.modality)
    keys = [_h(args.salt, "pacs-instance", sop, n=16) for _, _, sop in instances]
    todo = [(uids, key) for uids, key in zip(instances, keys, strict=True) if key not in state["done"]]
    before = len(instances) - len(todo)
    if args.max_instances is not None:
        todo = todo[: args.max_instances]
    log.info("query matched %d instance(s); %d pulled before, %d to pull now", len(instances), before, len(todo))
    columns = (TextColumn("pull"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=args.no_progress) as progress:
        task = progress.add_task("pull", total=len(instances), completed=before)
        for number, (uids, key) in enumerate(todo, start=before + 1):
            state["done"][key] = pull_one(client, uids, key, args, dst, number, len(instances))
            save_state(dst, state)
            progress.advance(task)
    result = finish(dst, state, args.pixels)
    left = len(instances) - len(state["done"])
    log.info("pulled %d instance(s) now, %d before; %d left; %d image(s) in the manifest; %d error(s), %d "
             "quarantined (see ingest_report.json)", len(todo), before, left, result.items, len(result.errors),
             len(result.quarantined))
    if left:
        return EXIT_PARTIAL
    return EXIT_OK if result.items else EXIT_NOTHING


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m datatools.pacs_query", description=__doc__.split("\n\n")[0])
    parser.add_argument("url", metavar="URL", help="DICOMweb root of the PACS, e.g. http://pacs:8042/dicom-web")
    parser.add_argument("dst", metavar="DST", help="output folder (also holds the resumable pull state)")
    parser.add_argument("--modality", default=None, help="studies with this modality, and only its series (e.g. CT)")
    parser.add_argument("--study-date", default=None, metavar="DATE[-DATE]",
                        help="StudyDate or range YYYYMMDD-YYYYMMDD")
    parser.add_argument("--salt", default=None, help=f"pseudonymisation salt (default: ${SALT_ENV})")
    parser.add_argument("--window", nargs=2, type=float, metavar=("C", "W"), default=None,
                        help="DICOM window center/width (default: the file's own, else min-max)")
    parser.add_argument("--pixels", choices=PIXEL_MODES, default="quarantine",
                        help="possible burned-in text: not written (quarantine), masked (clean) or kept (keep)")
    parser.add_argument("--sidecar", action="store_true", help="write de-identified DICOM headers as JSON")
    parser.add_argument("--patient-split", nargs=2, type=float, metavar=("VAL", "TEST"), default=None,
                        help="assign whole patients to val/test with these fractions")
    parser.add_argument("--max-instances", type=int, default=None, help="stop after this many new instances")
    parser.add_argument("--timeout", type=float, default=60.0, help="DICOMweb request timeout in s (default: 60)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.salt = args.salt or os.environ.get(SALT_ENV)
    if not args.salt:
        parser.error(f"a salt is required: --salt or ${SALT_ENV}")
    args.window = tuple(args.window) if args.window is not None else None
    if args.patient_split is not None:
        val, test = args.patient_split
        if val < 0 or test < 0 or val + test >= 1:
            parser.error("--patient-split fractions must be >= 0 and sum to < 1")
        args.patient_split = (val, test)
    # what datatools.ingest_dicom's per-file code reads besides the options above
    args.label_from, args.nifti_axis, args.format, args.size = "none", 2, "png", 64
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    with ingest_logging(Path(args.dst)):
        try:
            return pull(args)
        except (PacsError, PullError) as exc:
            log.error("%s", exc)
            return EXIT_NOTHING


if __name__ == "__main__":
    sys.exit(main())
