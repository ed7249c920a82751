"""``python -m serve <command>``: run Triton, control its models, predict files, run batch inference.

Commands::

    start    --model-repository DIR [--http-port 8000 --grpc-port 8001 --metrics-port 8002]
             [--tritonserver PATH] [--model-control none|explicit] [--load NAME ...] [--timeout 120]
    load     NAME [--url HOST:PORT]
    unload   NAME [--url HOST:PORT]
    predict  FILE... --model NAME [--version V] [--backend http|grpc|local] [--url HOST:PORT]
             [--model-repository DIR] [--top-k 3] [--json] [--timeout 30] [--retries 3] [--start-server]
    batch    INPUT --out predictions.csv --model NAME [backend options] [--split test] [--workers 2]
             [--in-flight 4] [--batch-size 16] [--no-resume] [--compare-run RUN_DIR|latest] [--log-dir logs]
             [--start-server] [--no-rollout]
    predict|batch --dicomweb URL --study UID [--series UID] [--store-results] --model NAME [backend options]
             a PACS study instead of files: answer per series and study, SRs back with STOW-RS (serve.dicomweb)
    drift    INPUT --name NAME [--model-repository DIR] [--version V] [--split test] [--fail-on-drift]
             [--out DIR] [--alpha 0.01] [--psi-threshold 0.2] [--min-window 30]
    promote  NAME VERSION [--eval-data NPZ|DIR|CSV] [--split test] [--tolerance 0.01] [--force] [--url HOST:PORT]
    rollback NAME [--url HOST:PORT]
    canary   NAME VERSION [--share 0.1] [--url HOST:PORT]
    shadow   NAME VERSION [--url HOST:PORT]
    end-trial NAME [--url HOST:PORT]
    status   NAME [--model-repository DIR]

Admin key: ``MEDOPS_TRITON_ADMIN_KEY`` (16+ visible ASCII characters, e.g. ``openssl rand -hex 32``). ``start`` puts
Triton's admin APIs (model repository incl. load/unload, shared memory, statistics, trace, logging) behind the
header ``medops-admin-key`` with that key; without it ``start`` warns that they are open (local development).
``load``, ``unload`` and the rollout commands with ``--url`` send the header when the variable is set. Health,
metadata and inference never need it. ``--start-server`` locks its private server with a random key.

Exit codes: 0 success; 1 an input failed (predict, batch), a model-control request was refused, or the server
could not start (start), a promotion was refused by its gate (promote); 2 the server is down or the model is
missing (predict, batch), the server stopped answering mid-run (batch: the rows written are kept), the CSV to resume
holds another model's, version's or input's rows (batch: nothing changed), a rollout command failed, and usage
errors; 3 drift detected (drift --fail-on-drift).

Torch-free: nothing here (or in what it imports) needs torch or Lightning.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.markup import escape

EXIT_OK = 0
EXIT_INPUT = 1  # an input could not be used; start: the server did not start
EXIT_SERVER = 2  # the server is down or the model is missing
EXIT_DRIFT = 3  # drift --fail-on-drift found drift

DEFAULT_PORTS = {"http": 8000, "grpc": 8001}

out = Console(soft_wrap=False)
err = Console(stderr=True)


class _Stop(Exception):
    """SIGTERM/SIGINT received: stop the server and exit cleanly."""


def _error(message: str) -> None:
    err.print(f"[bold red]error[/bold red]: {escape(message)}", soft_wrap=True)


def normalize_url(url: str) -> str:
    """``host:port`` for tritonclient (a leading ``http://``/``grpc://`` and trailing ``/`` are dropped)."""
    for scheme in ("http://", "https://", "grpc://"):
        if url.startswith(scheme):
            url = url[len(scheme):]
    return url.rstrip("/")


def _default_url(backend: str) -> str:
    return f"127.0.0.1:{DEFAULT_PORTS.get(backend, 8000)}"


# -- start -------------------------------------------------------------------------------------------------
def cmd_start(args: argparse.Namespace) -> int:
    from serve.triton_server import TritonNotFound

    server = _make_server(args)
    if server is None or not _verified(args.model_repository, args.load):
        return EXIT_INPUT

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise _Stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        err.print(f"starting Triton on {server.model_repository} (model control: {server.model_control}) ...")
        _print_admin_access(server)
        try:
            server.start(timeout=args.timeout)
        except (TritonNotFound, FileNotFoundError, RuntimeError) as exc:
            _error(f"Triton did not start: {exc}")
            return EXIT_INPUT
        _print_started(server)
        while True:
            code = server.returncode
            if code is not None:
                tail = "\n".join(server.log_text().splitlines()[-60:])
                _error(f"tritonserver exited by itself with code {code}; last server log lines:\n{tail}")
                return EXIT_INPUT
            time.sleep(0.5)
    except (_Stop, KeyboardInterrupt) as stop:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not interrupt the clean stop
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        err.print(f"{stop or 'interrupt'}: stopping Triton ...")
        code = server.stop()
        if code not in (0, None):
            err.print(f"[yellow]tritonserver exited with code {code}[/yellow]")
        err.print("Triton stopped")
        return EXIT_OK
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _verified(repository: str, names: list[str] | None) -> bool:
    """Every version Triton would load matches its recorded digests (and signature): else each refused version is
    printed and ``start`` stops before Triton sees the repository."""
    from serve.verify import check_repository, refused, signing_key

    checks = check_repository(repository, names, signing_key(), allow_unsealed=True)
    for line in refused(checks):
        _error(f"{line} (python -m serve verify for details; re-export the version)")
    unsealed = [f"{c.model} v{c.version}" for c in checks if not c.sealed]
    if unsealed:
        err.print(f"[yellow]warning[/yellow]: not verifiable (exported before versions were signed): "
                  f"{', '.join(unsealed)}")
    return all(c.ok for c in checks)


def cmd_verify(args: argparse.Namespace) -> int:
    from serve.verify import check_repository, render, signing_key

    key = signing_key()
    checks = check_repository(args.model_repository, args.names or None, key)
    if not checks:
        _error(f"no model versions found in {args.model_repository} for {', '.join(args.names) or 'any model'}")
        return EXIT_INPUT
    out.print(render(checks, key))
    bad = [c for c in checks if not c.ok]
    if bad:
        err.print(f"{len(bad)} of {len(checks)} version(s) refused")
        return EXIT_INPUT
    return EXIT_OK


def _make_server(args: argparse.Namespace) -> Any:
    """The TritonServer ``start`` runs, its admin APIs behind MEDOPS_TRITON_ADMIN_KEY when that is set; None (the
    error printed) when the arguments or the key are unusable."""
    from serve.triton_server import TritonServer, admin_key_from_env

    model_control = args.model_control or ("explicit" if args.load else "none")
    try:
        return TritonServer(
            args.model_repository, http_port=args.http_port, grpc_port=args.grpc_port,
            metrics_port=args.metrics_port, tritonserver=args.tritonserver, model_control=model_control,
            load_models=args.load or (), log_file=args.log_file, admin_key=admin_key_from_env(),
        )
    except ValueError as exc:  # AdminKeyError included: its message never contains the key
        _error(str(exc))
    return None


def _print_admin_access(server: Any) -> None:
    """Who may use the admin APIs: the key holders, or (no key: local development) anyone reaching the port."""
    from serve.triton_server import ADMIN_HEADER, ADMIN_KEY_ENV, RESTRICTED_APIS

    apis = ", ".join(RESTRICTED_APIS)
    if server.restricted:
        err.print(f"admin APIs ({apis}) need the header {ADMIN_HEADER} with the key from {ADMIN_KEY_ENV}; "
                  "health, metadata and inference are open", soft_wrap=True)
        return
    err.print(f"[bold yellow]warning[/bold yellow]: {ADMIN_KEY_ENV} is not set, so Triton's admin APIs ({apis}; "
              "model load/unload included) are open to every process that reaches port "
              f"{server.http_port}/{server.grpc_port} on this host. Fine for local development; elsewhere set it, "
              f"e.g. export {ADMIN_KEY_ENV}=$(openssl rand -hex 32)", soft_wrap=True)


def _print_started(server: Any) -> None:
    out.print(f"[bold green]Triton is ready[/bold green] (pid {server.process.pid}, repository "
              f"{escape(str(server.model_repository))})", soft_wrap=True)
    out.print(f"  HTTP     http://{server.http_url}")
    out.print(f"  gRPC     {server.grpc_url}")
    out.print(f"  metrics  {server.metrics_url}  (Prometheus)")
    out.print(f"  log      {server.log_path}", soft_wrap=True)
    for model in _repository_index(server.http_url, server.admin_headers()):
        state = model.get("state") or "UNAVAILABLE"
        colour = "green" if state == "READY" else "yellow"
        version = f" v{model['version']}" if model.get("version") else ""
        out.print(f"  model    {escape(model.get('name', '?'))}{version}: [{colour}]{state}[/{colour}]")
    out.print("press Ctrl-C (or send SIGTERM) to stop", style="dim")


def _repository_index(url: str, headers: dict[str, str] | None) -> list[dict[str, Any]]:
    import tritonclient.http as httpclient

    try:
        with httpclient.InferenceServerClient(url, connection_timeout=5, network_timeout=5) as client:
            return list(client.get_model_repository_index(headers=headers))
    except Exception:  # informational only
        return []


# -- load / unload -----------------------------------------------------------------------------------------
def cmd_model_control(args: argparse.Namespace) -> int:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from serve.triton_server import admin_headers, admin_hint

    url, name, action, headers = normalize_url(args.url), args.name, args.command, admin_headers()
    try:
        client = httpclient.InferenceServerClient(url, connection_timeout=args.timeout,
                                                  network_timeout=args.timeout)
    except Exception as exc:
        _error(f"invalid Triton URL {url!r}: {exc}")
        return EXIT_INPUT
    try:
        try:
            client.is_server_live()
        except Exception as exc:
            _error(f"Triton at {url} is not reachable ({type(exc).__name__}: {exc}); is the server running? "
                   "(--url HOST:PORT of its HTTP endpoint)")
            return EXIT_INPUT
        try:
            known = {m.get("name") for m in client.get_model_repository_index(headers=headers)}
            if name not in known:
                listed = ", ".join(sorted(str(k) for k in known if k)) or "none"
                _error(f"model {name!r} is not in the model repository of Triton at {url} (models: {listed})")
                return EXIT_INPUT
            if action == "load":
                client.load_model(name, headers=headers)
                if not _wait_ready(client, name, ready=True, timeout=args.timeout):
                    _error(f"model {name!r} did not become ready on Triton at {url}")
                    return EXIT_INPUT
                out.print(f"loaded model [bold]{escape(name)}[/bold] on {url}: ready")
            else:
                client.unload_model(name, headers=headers)
                if not _wait_ready(client, name, ready=False, timeout=args.timeout):
                    _error(f"model {name!r} is still ready on Triton at {url} after {args.timeout:.0f} s")
                    return EXIT_INPUT
                out.print(f"unloaded model [bold]{escape(name)}[/bold] on {url}")
        except InferenceServerException as exc:
            _error(f"{action} {name!r} on Triton at {url} failed: {exc.message() or exc}{admin_hint(exc)}")
            return EXIT_INPUT
        except Exception as exc:
            _error(f"{action} {name!r} on Triton at {url} failed ({type(exc).__name__}: {exc})")
            return EXIT_INPUT
    finally:
        client.close()
    return EXIT_OK


def _wait_ready(client: Any, name: str, *, ready: bool, timeout: float) -> bool:
    """Poll until the model's readiness is ``ready`` (unloading finishes asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        if bool(client.is_model_ready(name)) == ready:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


# -- shared by predict and batch -----------------------------------------------------------------------------
@contextmanager
def server_context(args: argparse.Namespace) -> Iterator[str]:
    """The Triton URL to use: ``--url`` as given, or with ``--start-server`` a bundled Triton started on
    ``--model-repository`` (explicit model control, only ``--model`` loaded, free loopback ports) for the
    duration of the block and stopped after it.

    Raises:
        ServeError: ``--start-server`` with the local backend, or the server did not start (message ends with
            the server log tail).
    """
    from serve.contract import ServeError

    if not getattr(args, "start_server", False):
        yield normalize_url(args.url or _default_url(args.backend))
        return
    if args.backend == "local":
        raise ServeError("--start-server needs --backend http or grpc (the local backend runs no server)")
    from serve.triton_server import TritonNotFound, TritonServer, free_port, generate_admin_key
    from serve.verify import check_repository, refused, signing_key

    bad = refused(check_repository(args.model_repository, [args.model], signing_key(), allow_unsealed=True))
    if bad:
        raise ServeError("; ".join(bad) + " (python -m serve verify for details; re-export the version)")
    # only inference is needed: the admin APIs get a random key that is never shown, so nobody can use them
    server = TritonServer(args.model_repository, http_port=free_port(), grpc_port=free_port(),
                          metrics_port=free_port(), tritonserver=args.tritonserver, model_control="explicit",
                          load_models=[args.model], admin_key=generate_admin_key())
    err.print(f"starting Triton on {server.model_repository} for model {args.model} ...")
    try:
        server.start(timeout=args.server_timeout)
    except (TritonNotFound, FileNotFoundError, RuntimeError) as exc:
        raise ServeError(f"could not start Triton for model {args.model!r}: {exc}") from exc
    try:
        err.print(f"Triton ready: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics {server.metrics_url}")
        yield server.http_url if args.backend == "http" else server.grpc_url
    finally:
        code = server.stop()
        err.print(f"Triton stopped (exit code {code})")


def open_model(args: argparse.Namespace, url: str) -> Any:
    """The backend for ``--backend``; ServeError with the URL/repository and model in the message."""
    from serve.client import open_backend
    from serve.contract import ServeError
    from serve.rollout import RolloutBackend, trial_of

    def open_version(version: str | int | None) -> Any:
        return open_backend(args.backend, url=url, model=args.model, version=version,
                            model_repository=args.model_repository,
                            **({} if args.backend == "local" else {"timeout": args.timeout,
                                                                   "retries": args.retries}))

    try:
        backend = open_version(args.version)
        trial = trial_of(backend.info) if args.version is None and not getattr(args, "no_rollout", False) else None
        if trial is None:
            return backend
        backend.close()
        mode, production, candidate, share = trial
        log_path = Path(args.log_dir if hasattr(args, "log_dir") else "logs") / "shadow" / \
            f"{args.model}-v{candidate}-{time.strftime('%Y-%m-%d_%H-%M-%S')}.jsonl"
        err.print(f"rollout: {mode} of v{candidate} beside production v{production}"
                  + (f" ({share:.0%} of requests)" if mode == "canary" else f"; disagreements -> {log_path}"))
        return RolloutBackend(open_version, mode, production, candidate, share,
                              shadow_log=log_path if mode == "shadow" else None)
    except ServeError as exc:
        where = (f"model repository {args.model_repository}" if args.backend == "local"
                 else f"Triton {'HTTP' if args.backend == 'http' else 'gRPC'} at {url}")
        raise ServeError(f"cannot use model {args.model!r} ({where}): {exc}") from exc


def _backend_label(args: argparse.Namespace, url: str) -> str:
    return f"local onnxruntime ({args.model_repository})" if args.backend == "local" else f"{args.backend} {url}"


# -- predict -----------------------------------------------------------------------------------------------
def cmd_predict(args: argparse.Namespace) -> int:
    from serve.contract import ServeError
    from serve.predict import failed, predict_files, render_errors, render_json, render_table

    if args.dicomweb or not args.files:
        return cmd_dicomweb(args)
    try:
        with server_context(args) as url:
            backend = open_model(args, url)
            try:
                results = predict_files(args.files, backend, top_k=args.top_k)
                info = backend.info
                _rollout_report(backend, None)
            finally:
                backend.close()
    except ServeError as exc:
        _error(str(exc))
        return EXIT_SERVER
    if args.json:
        print(render_json(results), flush=True)
    else:
        if any("error" not in r for r in results):
            out.print(render_table(results, info, _backend_label(args, url)))
        render_errors(results, err)
    bad = failed(results)
    if bad:
        err.print(f"{len(bad)} of {len(results)} input(s) could not be read")
        return EXIT_INPUT
    return EXIT_OK


# -- batch -------------------------------------------------------------------------------------------------
def cmd_batch(args: argparse.Namespace) -> int:
    from medops import ImageReadError
    from medops.run_record import RunRecordError, latest_run
    from serve.batch import compare_with_run, run_batch
    from serve.contract import ServeError
    from serve.inputs import iter_inputs, skipped_text

    if args.dicomweb or args.input is None:
        return cmd_dicomweb(args)
    try:
        with server_context(args) as url:
            backend = open_model(args, url)
            try:
                try:
                    items, info = iter_inputs(args.input, split=args.split, class_names=backend.info.class_names)
                except (ServeError, ImageReadError, OSError, ValueError, KeyError) as exc:
                    _error(f"cannot read batch input {args.input}: {exc}")
                    return EXIT_INPUT
                if info:
                    err.print(f"input: {escape(_describe(info))}", soft_wrap=True)
                if info.get("skipped"):
                    err.print(f"[yellow]warning[/yellow]: skipped {escape(skipped_text(info['skipped']))}",
                              soft_wrap=True)
                summary = run_batch(items, backend, args.out, workers=args.workers, in_flight=args.in_flight,
                                    batch_size=args.batch_size, resume=not args.no_resume,
                                    progress=sys.stderr.isatty(), source=_source(info))
                _rollout_report(backend, Path(f"{args.out}.rollout.json"))
            finally:
                backend.close()
    except ServeError as exc:
        _error(str(exc))
        return EXIT_SERVER

    out.print(summary.table())
    if args.compare_run:
        try:  # a run folder or its run.json
            run = latest_run(args.log_dir) if args.compare_run == "latest" else Path(args.compare_run)
            out.print(compare_with_run(summary, run))
        except (ServeError, RunRecordError) as exc:  # the predictions are written; the comparison failed
            _error(f"cannot compare with run {args.compare_run}: {exc}")
            return EXIT_INPUT
    errors = _count_errors(summary)
    if errors:
        err.print(f"[yellow]{errors} input(s) failed; see the error column of {escape(str(args.out))}[/yellow]")
        return EXIT_INPUT
    return EXIT_OK


def _source(info: dict[str, Any]) -> str:
    """The input a batch row came from, as the CSV's ``source`` records it: a digest of its absolute path and split,
    not the path itself (a folder can carry a patient's name, and it would be on every row)."""
    import hashlib

    split = f" split {info['split']}" if info.get("split") else ""
    return "input " + hashlib.sha256(f"{Path(info['source']).resolve()}{split}".encode()).hexdigest()[:12]


# -- predict / batch from a PACS (DICOMweb) ---------------------------------------------------------------------
def cmd_dicomweb(args: argparse.Namespace) -> int:
    """``predict``/``batch`` with ``--dicomweb URL --study UID``: classify the study's series (serve.dicomweb), print
    the answer per series and study, write it (batch: ``--out`` CSV and JSON) and with ``--store-results`` store
    one SR per series back into the study."""
    from serve import dicomweb
    from serve.contract import ServeError

    if not (args.dicomweb and args.study):
        _error("give image files (predict) or an INPUT (batch), or a PACS study: --dicomweb URL --study UID")
        return EXIT_SERVER
    try:
        with server_context(args) as url:
            backend = open_model(args, url)
            try:
                result = dicomweb.classify_study(
                    args.dicomweb, args.study, backend, series_uid=args.series, timeout=args.pacs_timeout,
                    progress=lambda s: err.print(f"series {s.key} ({s.modality}): {len(s.probabilities)} of "
                                                 f"{s.instances} image(s) classified"))
            finally:
                backend.close()
        if args.store_results:
            reports = dicomweb.store_results(args.dicomweb, args.study, result, timeout=args.pacs_timeout)
            err.print(f"stored {len(reports)} result SR(s) in the study (STOW-RS)")
    except ServeError as exc:
        _error(str(exc))
        return EXIT_SERVER
    if getattr(args, "json", False):
        print(json.dumps(result.as_dict(), indent=2), flush=True)
    else:
        out.print(dicomweb.render_table(result, _backend_label(args, url)))
    if args.command == "batch":
        csv_path, summary = dicomweb.write_csv(result, args.out)
        err.print(f"wrote {escape(str(csv_path))} and {escape(str(summary))}", soft_wrap=True)
    failed = sum(len(s.failed) for s in result.series)
    for s in result.series:
        for f in s.failed:
            err.print(f"[yellow]error[/yellow]: series {s.key} image {f['instance']}: {escape(f['reason'])}")
        for warning in sorted(set(s.warnings)):
            err.print(f"[yellow]warning[/yellow]: series {s.key}: {escape(warning)}", soft_wrap=True)
    return EXIT_INPUT if failed or not result.images else EXIT_OK


def _rollout_report(backend: Any, path: Path | None) -> None:
    """Per-version figures of a canary/shadow run: printed, and written to ``path`` as JSON."""
    from serve.rollout import RolloutBackend

    if not isinstance(backend, RolloutBackend):
        return
    import json

    from rich.table import Table

    report = backend.report()
    table = Table(title=f"{report['mode']}: production v{report['production']} / candidate v{report['candidate']}")
    for column in ("version", "role", "requests", "images", "p50 ms", "p95 ms", "class shares"):
        table.add_column(column)
    for version, v in report["versions"].items():
        lat = v["latency_ms"]
        shares = ", ".join(f"{k} {x:.0%}" for k, x in v["class_shares"].items() if x is not None)
        table.add_row(version, v["role"], str(v["requests"]), str(v["images"]),
                      "-" if lat["p50"] is None else f"{lat['p50']:.1f}",
                      "-" if lat["p95"] is None else f"{lat['p95']:.1f}", shares or "-")
    out.print(table)
    if report.get("shadow"):
        sh = report["shadow"]
        agreement = "-" if sh["agreement"] is None else f"{sh['agreement']:.2%}"
        out.print(f"shadow agreement {agreement} over {sh['compared']} images; {sh['disagreements']} "
                  f"disagreement(s) logged to {sh['log']}", soft_wrap=True)
    if path is not None:
        path.write_text(json.dumps(report, indent=2) + "\n")
        out.print(f"rollout report: {path}", soft_wrap=True)


# -- drift -------------------------------------------------------------------------------------------------
def cmd_drift(args: argparse.Namespace) -> int:
    from medops.drift import DriftThresholds
    from serve.contract import ServeError
    from serve.drift import run_drift, write_outputs

    overrides = {k: v for k, v in (("alpha", args.alpha), ("psi_threshold", args.psi_threshold),
                                   ("min_window", args.min_window)) if v is not None}
    try:
        thresholds = None
        if overrides:
            meta_th = _exported_thresholds(args)
            thresholds = DriftThresholds.from_mapping({**meta_th, **overrides})
        report = run_drift(args.input, args.model_repository, args.name, version=args.version, split=args.split,
                           thresholds=thresholds)
    except ServeError as exc:
        _error(str(exc))
        return EXIT_SERVER
    out.print(report.table())
    for path, error in report.failed:
        err.print(f"[yellow]skipped[/yellow] {escape(path)}: {escape(error)}", soft_wrap=True)
    folder = write_outputs(report, args.out, args.log_dir)
    colour = {"drift": "bold red", "no drift": "bold green"}.get(report.result.verdict, "yellow")
    out.print(f"verdict: [{colour}]{report.result.verdict}[/] (score {report.result.score:.3f}); "
              f"{escape(str(folder / 'drift.json'))}, {escape(str(folder / 'drift.png'))}", soft_wrap=True)
    if report.result.drifted and args.fail_on_drift:
        return EXIT_DRIFT
    return EXIT_INPUT if report.failed else EXIT_OK


def _exported_thresholds(args: argparse.Namespace) -> dict[str, Any]:
    from medops.model_version import read_metadata
    from serve.drift import version_dir

    meta = read_metadata(version_dir(args.model_repository, args.name, args.version))
    return dict(meta.drift.get("thresholds") or {})


# -- rollouts ----------------------------------------------------------------------------------------------
def cmd_rollout(args: argparse.Namespace) -> int:
    from medops.model_version import HISTORY_FILE
    from serve import rollout
    from serve.contract import ServeError

    repo, name = args.model_repository, args.name
    url = normalize_url(args.url) if args.url else None
    try:
        if args.command == "promote":
            entry = rollout.promote(repo, name, args.version, data=args.eval_data, split=args.split,
                                    tolerance=args.tolerance, force=args.force, url=url, timeout=args.timeout)
            for reason in entry["gate"]["reasons"]:
                out.print(f"  gate: {escape(reason)}", soft_wrap=True)
            if entry["decision"] == "refused":
                _error(f"promotion of {name} v{args.version} refused by the gate (recorded in "
                       f"{HISTORY_FILE}); --force overrides it, and is recorded as forced")
                return EXIT_INPUT
            out.print(f"[bold green]{escape(name)} v{args.version} is production[/]"
                      + (" (forced past the gate)" if entry["forced"] else ""))
        elif args.command == "rollback":
            entry = rollout.rollback(repo, name, url=url, timeout=args.timeout)
            out.print(f"[bold]{escape(name)}[/] rolled back: v{entry['from']} -> v{entry['to']} is production")
        elif args.command in ("canary", "shadow"):
            rollout.start_trial(repo, name, args.version, args.command, share=getattr(args, "share", 0.0),
                                url=url, timeout=args.timeout)
            out.print(f"{args.command} of {escape(name)} v{args.version} started")
        elif args.command == "end-trial":
            entry = rollout.end_trial(repo, name, url=url, timeout=args.timeout)
            out.print(f"{entry['action']} of v{entry['candidate']}; production v{entry['production']} only")
        else:
            state = rollout.read_state(repo, name)
            out.print(f"{escape(name)}: versions {rollout.versions_of(repo, name)}; production "
                      f"{state.production}; previous {state.previous}; trial "
                      f"{state.mode + ' of v' + str(state.candidate) if state.mode else 'none'}")
            for entry in rollout.read_history(repo, name)[-10:]:
                out.print(f"  {entry['time']}  {escape(entry['action'])}  "
                          f"{escape(str({k: v for k, v in entry.items() if k in ('from', 'to', 'decision')}))}")
            return EXIT_OK
    except ServeError as exc:
        _error(str(exc))
        return EXIT_SERVER
    if not url:
        out.print("[dim]repository updated; a running Triton picks it up with `python -m serve load "
                  f"{escape(name)}` (or pass --url)[/dim]")
    return EXIT_OK


def _describe(info: Any) -> str:
    if isinstance(info, dict):
        return ", ".join(f"{k}={v}" for k, v in info.items() if not isinstance(v, (list, dict, tuple)))
    return str(info)


def _count_errors(summary: Any) -> int:
    value = getattr(summary, "errors", 0)
    if isinstance(value, (list, tuple, set, dict)):
        return len(value)
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


# -- parser ------------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _backend_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("model and backend")
    group.add_argument("--model", required=True, help="model name (the folder in the model repository)")
    group.add_argument("--version", default=None, help="model version (default: the latest served)")
    group.add_argument("--backend", choices=("http", "grpc", "local"), default="http",
                       help="Triton over HTTP or gRPC, or onnxruntime in-process (default: http)")
    group.add_argument("--url", default=None,
                       help="Triton HOST:PORT (default: 127.0.0.1:8000 for http, 127.0.0.1:8001 for grpc)")
    group.add_argument("--model-repository", default="model_repository",
                       help="model repository for --backend local and --start-server (default: model_repository)")
    group.add_argument("--timeout", type=float, default=30.0, help="client timeout in seconds (default: 30)")
    group.add_argument("--retries", type=_non_negative_int, default=3,
                       help="retries of a failed connection, with backoff (default: 3)")
    group.add_argument("--start-server", action="store_true",
                       help="start the bundled Triton on --model-repository for this command, stop it after")
    group.add_argument("--tritonserver", default=None, help="tritonserver binary for --start-server")
    group.add_argument("--server-timeout", type=float, default=120.0,
                       help="seconds to wait for --start-server's Triton to be ready (default: 120)")
    return common


_Subparsers = argparse._SubParsersAction  # what add_subparsers returns
_ADMIN_EPILOG = ("MEDOPS_TRITON_ADMIN_KEY (environment): the key of a Triton whose admin APIs are restricted, sent "
                 "as the header medops-admin-key with model load and repository requests.")


def _add_start_parser(sub: _Subparsers) -> None:
    """``start``: run Triton until Ctrl-C/SIGTERM."""
    start = sub.add_parser("start", help="start Triton and wait until Ctrl-C/SIGTERM", epilog=(
        "MEDOPS_TRITON_ADMIN_KEY (environment): puts the admin APIs (model repository incl. load/unload, shared "
        "memory, statistics, trace, logging) behind the header medops-admin-key with this key; unset: they are "
        "open (a warning says so). Health, metadata and inference stay open."))
    start.add_argument("--model-repository", required=True, help="Triton model repository folder")
    start.add_argument("--http-port", type=int, default=8000)
    start.add_argument("--grpc-port", type=int, default=8001)
    start.add_argument("--metrics-port", type=int, default=8002)
    start.add_argument("--tritonserver", default=None,
                       help="tritonserver binary (default: on PATH, else the one bundled in nvidia-pytriton)")
    start.add_argument("--model-control", choices=("none", "explicit"), default=None,
                       help="none: load every model; explicit: load/unload on request "
                            "(default: explicit with --load, else none)")
    start.add_argument("--load", nargs="+", metavar="NAME", default=None,
                       help="models to load at start (explicit model control)")
    start.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness (default: 120)")
    start.add_argument("--log-file", default=None, help="server log file (default: a temporary file)")
    start.set_defaults(func=cmd_start)


def _add_verify_parser(sub: _Subparsers) -> None:
    """``verify``: model versions against their recorded digests and signature."""
    verify = sub.add_parser("verify", help="check that model versions are exactly what export wrote (and signed)",
                            epilog="MEDOPS_MODEL_SIGNING_KEY (environment): also check each version's HMAC "
                                   "signature, and refuse unsigned versions. Exit status 1 when a version is refused.")
    verify.add_argument("names", nargs="*", metavar="NAME", help="model names (default: every model)")
    verify.add_argument("--model-repository", default="model_repository", help="(default: model_repository)")
    verify.set_defaults(func=cmd_verify)


def _add_model_control_parsers(sub: _Subparsers) -> None:
    """``load`` and ``unload``: explicit model control on a running Triton."""
    for name, text in (("load", "load a model (explicit model control)"),
                       ("unload", "unload a model (explicit model control)")):
        cmd = sub.add_parser(name, help=text, epilog=_ADMIN_EPILOG)
        cmd.add_argument("name", metavar="NAME", help="model name")
        cmd.add_argument("--url", default=_default_url("http"),
                         help="Triton HTTP endpoint HOST:PORT (default: 127.0.0.1:8000)")
        cmd.add_argument("--timeout", type=float, default=60.0,
                         help="seconds to wait for the request and the model state (default: 60)")
        cmd.set_defaults(func=cmd_model_control)


def _add_no_rollout(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--no-rollout", action="store_true",
                     help="ignore a canary/shadow trial announced by the served model; use --version or latest")


def _add_dicomweb_options(cmd: argparse.ArgumentParser) -> None:
    """``--dicomweb URL --study UID [--series UID] [--store-results]``: a PACS study instead of files."""
    group = cmd.add_argument_group("from a PACS (DICOMweb)")
    group.add_argument("--dicomweb", default=None, metavar="URL",
                       help="DICOMweb root of the PACS, e.g. http://pacs:8042/dicom-web (with --study)")
    group.add_argument("--study", default=None, metavar="UID", help="StudyInstanceUID to classify")
    group.add_argument("--series", default=None, metavar="UID", help="only this SeriesInstanceUID of the study")
    group.add_argument("--store-results", action="store_true",
                       help="store one DICOM SR per classified series back into the study (STOW-RS)")
    group.add_argument("--pacs-timeout", type=float, default=60.0, help="DICOMweb request timeout (default: 60)")


def _add_predict_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """``predict``: image files through a backend (``common``: the backend options)."""
    predict = sub.add_parser("predict", parents=[common], help="predict image files (PNG/JPEG/DICOM/.npy)")
    predict.add_argument("files", nargs="*", metavar="FILE", help="image files (or --dicomweb URL --study UID)")
    predict.add_argument("--top-k", type=_positive_int, default=3, help="classes to show per file (default: 3)")
    predict.add_argument("--json", action="store_true", help="print a JSON array, one object per file")
    predict.set_defaults(func=cmd_predict)
    _add_no_rollout(predict)
    _add_dicomweb_options(predict)


def _add_batch_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """``batch``: a dataset or folder into a predictions CSV (``common``: the backend options)."""
    batch = sub.add_parser("batch", parents=[common], help="batch inference over a dataset or folder into a CSV")
    batch.add_argument("input", metavar="INPUT", nargs="?", default=None,
                       help="a MedMNIST .npz, an image folder, a CSV or a file list (or --dicomweb URL --study UID)")
    batch.add_argument("--out", default="predictions.csv", help="predictions CSV (default: predictions.csv)")
    batch.add_argument("--split", default="test", help="split of a MedMNIST .npz (default: test)")
    batch.add_argument("--workers", type=_positive_int, default=2, help="image-reading workers (default: 2)")
    batch.add_argument("--in-flight", type=_positive_int, default=4, help="concurrent requests (default: 4)")
    batch.add_argument("--batch-size", type=_positive_int, default=16, help="images per request (default: 16)")
    batch.add_argument("--no-resume", action="store_true", help="start over instead of resuming --out")
    batch.add_argument("--compare-run", default=None, metavar="RUN_DIR|latest",
                       help="compare accuracy/AUROC with a training run's test metrics")
    batch.add_argument("--log-dir", default="logs", help="where --compare-run latest looks (default: logs)")
    batch.set_defaults(func=cmd_batch)
    _add_no_rollout(batch)
    _add_dicomweb_options(batch)


def _add_drift_parser(sub: _Subparsers) -> None:
    """``drift``: new images against the model's reference profile."""
    drift = sub.add_parser("drift", help="compare new images with the model's reference profile (drift check)")
    drift.add_argument("input", metavar="INPUT", help="image folder, CSV manifest, file list or MedMNIST .npz")
    drift.add_argument("--name", "--model", dest="name", required=True, help="model name")
    drift.add_argument("--model-repository", default="model_repository", help="(default: model_repository)")
    drift.add_argument("--version", type=int, default=None, help="model version (default: the latest)")
    drift.add_argument("--split", default="test", help="split of a MedMNIST .npz or CSV (default: test)")
    drift.add_argument("--fail-on-drift", action="store_true", help=f"exit {EXIT_DRIFT} when drift is detected")
    drift.add_argument("--out", default=None, help="folder for drift.json and drift.png (default: logs/drift/...)")
    drift.add_argument("--log-dir", default="logs", help="(default: logs)")
    drift.add_argument("--alpha", type=float, default=None, help="family-wise significance (default: exported)")
    drift.add_argument("--psi-threshold", type=float, default=None, help="PSI a drifted feature reaches")
    drift.add_argument("--min-window", type=int, default=None, help="fewer images: insufficient data")
    drift.set_defaults(func=cmd_drift)


def _add_rollout_parser(sub: _Subparsers, name: str, text: str, version: bool) -> argparse.ArgumentParser:
    """One rollout command (NAME [VERSION], repository, reload URL and timeout)."""
    cmd = sub.add_parser(name, help=text, epilog=_ADMIN_EPILOG)
    cmd.add_argument("name", metavar="NAME", help="model name")
    if version:
        cmd.add_argument("version", metavar="VERSION", type=_positive_int, help="model version")
    cmd.add_argument("--model-repository", default="model_repository", help="(default: model_repository)")
    cmd.add_argument("--url", default=None, help="running Triton HTTP HOST:PORT to reload (explicit control)")
    cmd.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the reload")
    cmd.set_defaults(func=cmd_rollout)
    return cmd


def _add_rollout_parsers(sub: _Subparsers) -> None:
    """``promote``, ``rollback``, ``canary``, ``shadow``, ``end-trial`` and ``status``."""
    promote = _add_rollout_parser(sub, "promote", "make a version production, if it passes the promotion gate", True)
    promote.add_argument("--eval-data", default=None, help="fixed labelled evaluation set (.npz, folder or CSV)")
    promote.add_argument("--split", default="test", help="split of --eval-data (default: test)")
    promote.add_argument("--tolerance", type=float, default=0.01,
                         help="candidate AUROC may be this much below production's (default: 0.01)")
    promote.add_argument("--force", action="store_true", help="promote even if the gate refuses (recorded)")
    _add_rollout_parser(sub, "rollback", "return to the previous production version", False)
    canary = _add_rollout_parser(sub, "canary", "serve a candidate version to a share of requests", True)
    canary.add_argument("--share", type=float, default=0.1, help="share of requests to the candidate (default 0.1)")
    _add_rollout_parser(sub, "shadow", "send every request to a candidate too; answer with production", True)
    _add_rollout_parser(sub, "end-trial", "stop a canary or shadow trial", False)
    _add_rollout_parser(sub, "status", "show the rollout state and recent decisions", False)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m serve`` parser: one sub-command per action, each with its handler as ``func``."""
    parser = argparse.ArgumentParser(prog="python -m serve", description="Serve medical image classifiers with "
                                     "NVIDIA Triton: start the server, control models, predict, batch inference.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_start_parser(sub)
    _add_verify_parser(sub)
    _add_model_control_parsers(sub)
    common = _backend_options()
    _add_predict_parser(sub, common)
    _add_batch_parser(sub, common)
    _add_drift_parser(sub)
    _add_rollout_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
