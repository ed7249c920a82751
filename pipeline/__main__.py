"""``python -m pipeline COMMAND``: the continuous-training pipeline (settings: conf/pipeline.yaml, ``--set k=v``).

compile   write the Kubeflow Pipelines IR YAML (``--out pipeline.yaml``)
submit    compile and start a run on a Kubeflow Pipelines cluster (``--host URL``, kfp.Client)
schedule  a KFP recurring run of the pipeline (cron from ``kfp.schedule``)
run       run the same pipeline here with kfp's local runner, end to end, with a summary table
show      the summary table of a pipeline run record (``pipeline.json``)
trigger   start a run if the data changed enough since the last run (data-version diff)
receive   the Alertmanager webhook receiver: a drift alert starts one run per incident
graph     draw the pipeline's DAG (from the compiled IR) to a PNG
step      run one step with a JSON context (the Airflow DAG's pods run this)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console()
EXIT_BAD_INPUT = 2


def _config(args: argparse.Namespace) -> Any:
    from pipeline.definition import load_config

    return load_config(args.config, args.set)


def compile_package(cfg: Any, out: str | Path, *, cluster: bool = True) -> Path:
    """The IR YAML of the pipeline, its parameters defaulting to the config's (cluster paths with ``cluster``)."""
    from kfp import compiler

    from pipeline.definition import arguments, build

    defaults = arguments(cfg, engine="kfp", cluster=cluster)
    compiler.Compiler().compile(build(cfg), str(out), pipeline_parameters=defaults)
    return Path(out)


def submit_run(cfg: Any, *, host: str, trigger: dict[str, Any] | None = None, run_name: str | None = None,
               client: Any = None) -> str:
    """Compile and submit one run with ``kfp.Client`` (caching as ``kfp.caching``); returns the KFP run id."""
    import kfp

    from pipeline.definition import NAME, arguments

    client = client or kfp.Client(host=host)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_package(cfg, Path(tmp) / "pipeline.yaml")
        result = client.create_run_from_pipeline_package(
            str(package), arguments=arguments(cfg, engine="kfp", cluster=True, trigger=trigger),
            run_name=run_name or f"{NAME}-{(trigger or {}).get('kind', 'manual')}",
            experiment_name=str(cfg.kfp.experiment), enable_caching=bool(cfg.kfp.caching))
    return str(result.run_id)


def schedule_run(cfg: Any, *, host: str, client: Any = None) -> str:
    """A KFP recurring run of the pipeline on ``kfp.schedule.cron``; returns its id."""
    import kfp

    from pipeline.definition import arguments

    client = client or kfp.Client(host=host)
    experiment = client.create_experiment(name=str(cfg.kfp.experiment))
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_package(cfg, Path(tmp) / "pipeline.yaml")
        job = client.create_recurring_run(
            experiment_id=experiment.experiment_id, job_name=str(cfg.kfp.schedule.name),
            cron_expression=str(cfg.kfp.schedule.cron), max_concurrency=int(cfg.kfp.schedule.max_concurrency),
            pipeline_package_path=str(package), enable_caching=bool(cfg.kfp.caching),
            params=arguments(cfg, engine="kfp", cluster=True, trigger={"kind": "schedule",
                                                                       "cron": str(cfg.kfp.schedule.cron)}))
    return str(job.recurring_run_id)


def cmd_compile(args: argparse.Namespace) -> int:
    out = compile_package(_config(args), args.out, cluster=not args.local_paths)
    console.print(f"wrote {out} (Kubeflow Pipelines IR YAML; upload it in the KFP UI or `python -m pipeline submit`)")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    cfg = _config(args)
    run_id = submit_run(cfg, host=args.host or str(cfg.kfp.host), run_name=args.run_name)
    console.print(f"submitted run {run_id} to {args.host or cfg.kfp.host} (experiment {cfg.kfp.experiment})")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    cfg = _config(args)
    job = schedule_run(cfg, host=args.host or str(cfg.kfp.host))
    console.print(f"recurring run {job}: {cfg.kfp.schedule.name} on cron {cfg.kfp.schedule.cron!r}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from medops.pipeline_record import tracked_version
    from pipeline.definition import arguments
    from pipeline.local import run_local

    cfg = _config(args)
    trigger = json.loads(args.trigger) if args.trigger else {"kind": "manual"}
    args_ = arguments(cfg, engine="local", trigger=trigger, pipeline_run=args.run_id or "")
    if not Path(args_["data"]).exists():
        console.print(f"[red]error:[/] data {args_['data']} not found")
        return EXIT_BAD_INPUT
    version = tracked_version(args_["data"])  # keys the cache to the data's content where a tracker names it
    args_["data_version"] = json.dumps(version, sort_keys=True) if version else _file_digest(args_["data"])
    status, _ = run_local(cfg, args_, console)
    return status


def _file_digest(path: str) -> str:
    """The data's content key for the local cache: SHA-256 of a file; a folder's modification time (its files
    are checked by the validate step's fingerprint)."""
    import hashlib

    data = Path(path)
    if data.is_dir():
        return f"folder mtime {data.stat().st_mtime_ns}"
    digest = hashlib.sha256()
    with data.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def cmd_show(args: argparse.Namespace) -> int:
    from pipeline.local import print_record

    return print_record(args.record, console)


def cmd_trigger(args: argparse.Namespace) -> int:
    from pipeline.triggers import data_version_trigger

    cfg = _config(args)
    result = data_version_trigger(cfg, data=args.data, manifest=args.manifest, overrides=args.set)
    console.print(f"{result['data']}: {result['reason']}", soft_wrap=True)
    if result.get("run"):
        run = {k: v for k, v in result["run"].items() if k != "process"}
        console.print(f"started: {run}", soft_wrap=True)
    return 0


def cmd_receive(args: argparse.Namespace) -> int:
    from pipeline.triggers import AlertReceiver

    cfg = _config(args)
    host, port = args.host or str(cfg.triggers.drift.host), args.port or int(cfg.triggers.drift.port)
    server = AlertReceiver(cfg, overrides=args.set).serve(host, port)
    console.print(f"Alertmanager webhook receiver on http://{host}:{server.server_address[1]}/alerts "
                  f"(engine {cfg.triggers.engine}, cool-down {cfg.triggers.drift.cooldown_s} s); Ctrl-C stops it")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    from pipeline.graph import draw

    out = draw(_config(args), args.out)
    console.print(f"wrote {out}")
    return 0


def cmd_step(args: argparse.Namespace) -> int:
    from pipeline.workflow import run_step

    result = run_step(args.name, json.loads(Path(args.context[1:]).read_text() if args.context.startswith("@")
                                            else args.context))
    if args.xcom:  # where Airflow's KubernetesPodOperator reads the task's XCom
        Path(args.xcom).parent.mkdir(parents=True, exist_ok=True)
        Path(args.xcom).write_text(json.dumps(result))
    console.print_json(data=result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:]))
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=None, help="pipeline settings (default: conf/pipeline.yaml)")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set trial.mode=shadow (repeatable)")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", parents=[common], help="write the Kubeflow Pipelines IR YAML")
    c.add_argument("--out", default="pipeline.yaml", help="(default: pipeline.yaml)")
    c.add_argument("--local-paths", action="store_true", help="parameter defaults with this machine's paths")
    for name, text in (("submit", "compile and start a run on a Kubeflow Pipelines cluster"),
                       ("schedule", "create a KFP recurring run (kfp.schedule.cron)")):
        s = sub.add_parser(name, parents=[common], help=text)
        s.add_argument("--host", default=None, help="KFP API URL (default: kfp.host)")
        if name == "submit":
            s.add_argument("--run-name", default=None)
    r = sub.add_parser("run", parents=[common], help="run the pipeline here (kfp.local, subprocess runner)")
    r.add_argument("--trigger", default=None, help="JSON describing what started the run (set by the triggers)")
    r.add_argument("--run-id", default=None, help="pipeline run id (default: ct-<time>)")
    sh = sub.add_parser("show", help="summary of a pipeline run record")
    sh.add_argument("record", help="pipeline.json or its folder")
    t = sub.add_parser("trigger", parents=[common], help="start a run when the data changed enough")
    t.add_argument("--data", default=None, help="the data now (default: the config's data)")
    t.add_argument("--manifest", default=None, help="the last run's manifest (default: triggers.data_version)")
    rc = sub.add_parser("receive", parents=[common], help="Alertmanager webhook receiver for drift alerts")
    rc.add_argument("--host", default=None)
    rc.add_argument("--port", type=int, default=None)
    g = sub.add_parser("graph", parents=[common], help="draw the pipeline DAG to a PNG")
    g.add_argument("--out", default="docs/img/pipeline_dag.png")
    st = sub.add_parser("step", help="run one step with a JSON context (Airflow pods)")
    st.add_argument("name", choices=("begin", "validate", "train", "evaluate", "export", "gate", "trial", "promote",
                                     "finalize"))
    st.add_argument("--context", required=True, help="JSON (or @file): pipeline arguments and earlier results")
    st.add_argument("--xcom", default=None, help="also write the result here (/airflow/xcom/return.json)")
    return parser


COMMANDS = {"compile": cmd_compile, "submit": cmd_submit, "schedule": cmd_schedule, "run": cmd_run,
            "show": cmd_show, "trigger": cmd_trigger, "receive": cmd_receive, "graph": cmd_graph, "step": cmd_step}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/] {exc}", soft_wrap=True)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
